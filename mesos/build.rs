//! Generates the Mesos v1 messages (and the descriptors the JSON mapping reads) with a
//! protobuf compiler that comes from crates.io.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc_bin_vendored::protoc_bin_path()?)
        .file_descriptor_set_path(out.join("mesos_descriptor.bin"))
        // Each message knows its full name, which the JSON mapping looks its descriptor up by.
        .enable_type_names()
        .btree_map(["."]);
    let files = [
        "proto/mesos/v1/mesos.proto",
        "proto/mesos/v1/scheduler/scheduler.proto",
        "proto/mesos/v1/executor/executor.proto",
    ];
    config.compile_protos(&files, &["proto"])?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
