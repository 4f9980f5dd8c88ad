//! A bundle's `agora.toml`, as `agora run DIR` and `agora bundle check` read it from a
//! user's files: parsing and the resources it asks for never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = std::env::temp_dir();
    if let Ok(m) = agora_sdk::bundle::Manifest::parse(text, &dir) {
        let _ = m.resources();
    }
});
