//! Builds the example tasks and the guest-SDK bundles, and prints where they are:
//! `cargo run -p agora-examples --bin build-examples`.

fn main() -> std::process::ExitCode {
    let mut ok = true;
    for (target, label) in [
        (agora_examples::Target::P1, "wasm32-wasip1"),
        (agora_examples::Target::P2, "wasm32-wasip2"),
    ] {
        for name in agora_examples::TASKS {
            match agora_examples::try_task(name, target) {
                Ok(p) => println!("{label:<14} {name:<17} {}", p.display()),
                Err(e) => {
                    eprintln!("{e}");
                    ok = false;
                }
            }
        }
    }
    for name in agora_examples::GUEST_TASKS {
        if name == "wrongworld" {
            continue;
        }
        match agora_examples::try_guest_bundle(name) {
            Ok(p) => println!("{:<14} {name:<17} {}", "bundle", p.display()),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
