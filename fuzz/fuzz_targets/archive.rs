//! Archives a task fetches (`extract` URIs): tar, tar.gz and zip bytes unpacked into a
//! sandbox within a budget. Nothing may panic, and nothing may land outside the sandbox.
#![no_main]

use agora_archive::Kind;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let kind = match kind % 3 {
        0 => Kind::Tar,
        1 => Kind::TarGz,
        _ => Kind::Zip,
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("sandbox");
    let _ = agora_archive::extract_bytes(kind, bytes, &dest, 1 << 20);
    // Only the sandbox (and the zip's own copy beside it) may exist in the directory.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            name == "sandbox" || name == "sandbox.zip",
            "an entry escaped the sandbox: {name:?}"
        );
    }
});
