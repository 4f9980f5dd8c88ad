//! CPU-bound work: counts the primes below N (default 1,000,000) by trial division and prints
//! the count.

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let count = (0..n).filter(|&k| is_prime(k)).count();
    println!("{count} primes below {n}");
}
