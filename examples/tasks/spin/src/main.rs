//! Misbehaves: spins forever. Used to test CPU budgets and killing.

fn main() {
    println!("spinning");
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}
