//! Works in steps and says how far it is: the input is the number of steps (default 2).
//! Each step logs a line and reports progress; at the end it sends its framework a message
//! and returns `done after N steps`.

struct Steps;

impl agora_guest::Task for Steps {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(&input);
        let steps: u32 = if text.trim().is_empty() {
            2
        } else {
            text.trim()
                .parse()
                .map_err(|_| format!("the input {text:?} is not a number of steps"))?
        };
        if steps == 0 {
            return Err("there must be at least one step".into());
        }
        let mut acc = 0u64;
        for step in 1..=steps {
            // Some work between reports.
            for i in 0..200_000u64 {
                acc = acc.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            agora_guest::info(&format!("step {step} of {steps}"));
            agora_guest::progress(
                step as f32 / steps as f32,
                &format!("step {step} of {steps}"),
            );
        }
        agora_guest::message(format!("checksum {acc:x}").as_bytes());
        Ok(format!("done after {steps} steps").into_bytes())
    }
}

agora_guest::export_task!(Steps);
