//! Sleeps: `sleeper SECONDS` blocks in one WASI sleep (default 3600 s), then prints
//! `slept`. The density benchmark holds thousands of these at once.

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3600.0);
    std::thread::sleep(std::time::Duration::from_secs_f64(secs));
    println!("slept");
}
