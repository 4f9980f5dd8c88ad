//! Misbehaves: allocates and touches memory in 1 MiB chunks until it is stopped.

fn main() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let chunk = vec![0xa5u8; 1 << 20];
        hoard.push(std::hint::black_box(chunk));
        if hoard.len() % 16 == 0 {
            println!("holding {} MiB", hoard.len());
        }
    }
}
