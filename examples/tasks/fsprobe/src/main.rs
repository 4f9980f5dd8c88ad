//! Probes its file-system sandbox: writes and reads back a file in its sandbox, then tries to
//! reach paths outside it. Prints one line per probe: `<probe>: ok` or `<probe>: denied (<error>)`.

use std::fs;

fn report(probe: &str, result: std::io::Result<String>) {
    match result {
        Ok(s) => println!("{probe}: ok {}", s.trim()),
        Err(e) => println!("{probe}: denied ({e})"),
    }
}

fn main() {
    report(
        "write-relative",
        fs::write("note.txt", "written by fsprobe").map(|()| String::new()),
    );
    report("read-relative", fs::read_to_string("note.txt"));
    report("read-absolute", fs::read_to_string("/note.txt"));
    report(
        "escape-dotdot",
        fs::read_to_string("../../../../etc/hostname"),
    );
    report("escape-absolute", fs::read_to_string("/etc/hostname"));
    report(
        "env-home",
        std::env::var("HOME").map_err(|e| std::io::Error::other(e.to_string())),
    );
}
