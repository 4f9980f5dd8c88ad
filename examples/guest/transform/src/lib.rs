//! A text transform: returns its input changed as the `MODE` environment variable says —
//! `upper`, `lower`, `rot13`, or `reverse-lines`. An unknown mode is the task's error.

struct Transform;

fn rot13(c: char) -> char {
    match c {
        'a'..='z' => (((c as u8 - b'a') + 13) % 26 + b'a') as char,
        'A'..='Z' => (((c as u8 - b'A') + 13) % 26 + b'A') as char,
        _ => c,
    }
}

impl agora_guest::Task for Transform {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(input).map_err(|e| format!("the input is not UTF-8: {e}"))?;
        let mode = std::env::var("MODE").unwrap_or_else(|_| "upper".into());
        let out = match mode.as_str() {
            "upper" => text.to_uppercase(),
            "lower" => text.to_lowercase(),
            "rot13" => text.chars().map(rot13).collect(),
            "reverse-lines" => {
                let mut lines: Vec<&str> = text.lines().collect();
                lines.reverse();
                lines.join("\n")
            }
            other => {
                return Err(format!(
                    "unknown MODE {other:?} (use upper, lower, rot13 or reverse-lines)"
                ));
            }
        };
        agora_guest::debug(&format!("{mode}: {} bytes", out.len()));
        Ok(out.into_bytes())
    }
}

agora_guest::export_task!(Transform);
