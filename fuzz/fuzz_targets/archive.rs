//! Archives a task fetches (`extract` URIs): tar, tar.gz and zip bytes unpacked into a
//! sandbox within a budget. Nothing may panic, and nothing may land outside the sandbox.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("sandbox");
    let _ =
        agora_agent::fetcher::fuzzing::extract(bytes, kind & 1 == 1, kind & 2 == 2, &dest, 1 << 20);
    // Only the sandbox (and the zip's own copy beside it) may exist in the directory.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            name == "sandbox" || name == "sandbox.zip",
            "an entry escaped the sandbox: {name:?}"
        );
    }
});
