//! The master's ACL and tokens files: parsing never panics, and a parsed ACL answers any
//! question.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(acls) = agora_master::acl::Acls::parse(text) {
        for a in agora_master::acl::Action::ALL {
            let _ = acls.decide(Some("p"), a, "a/b");
            let _ = acls.decide(None, a, "");
        }
    }
    let _ = agora_master::auth::Tokens::parse(text);
});
