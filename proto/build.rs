//! Generates the agora.v1 messages and services with a protobuf compiler that comes from
//! crates.io, so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // The services and methods as data: tests enumerate every method from it.
        .file_descriptor_set_path(out.join("agora_descriptor.bin"))
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/agora/v1/agora.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/agora/v1/agora.proto");
    Ok(())
}
