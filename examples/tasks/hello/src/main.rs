//! Greets its arguments: `hello Agora` prints "Hello, Agora!".
//!
//! `GREETING` replaces "Hello"; `EXIT_CODE` makes it exit with that code after greeting.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = if args.is_empty() {
        "world".to_string()
    } else {
        args.join(" ")
    };
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_string());
    println!("{greeting}, {name}!");
    eprintln!("hello: greeted {} argument(s)", args.len());
    if let Ok(code) = std::env::var("EXIT_CODE") {
        std::process::exit(code.parse().unwrap_or(1));
    }
}
