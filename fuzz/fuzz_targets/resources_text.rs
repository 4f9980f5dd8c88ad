//! The resource text syntax (`cpus:2;mem(role,principal):512;ports:[31000-32000]`), as
//! flags and bundle manifests give it: parsing never panics, and what parses prints back
//! to text that parses to the same resources.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = agora_core::parse_resources(text) {
        let again = agora_core::parse_resources(&r.to_string()).expect("printed resources parse");
        assert_eq!(again, r, "{text:?} printed as {r}");
    }
});
