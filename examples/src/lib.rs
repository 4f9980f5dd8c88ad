//! Agora's example Wasm tasks, built on demand.
//!
//! The task sources live in `examples/tasks/` (their own Cargo workspace, since they build for
//! `wasm32-wasip1` and `wasm32-wasip2`, not for the host). [`task`] builds them once per
//! process — installing the rustup targets if they are missing — and returns the path of a
//! module or component, so tests always run what the sources say.
//!
//! | task      | what it does                                               |
//! |-----------|------------------------------------------------------------|
//! | `hello`   | prints `Hello, <args>!` (`GREETING`, `EXIT_CODE` env vars)  |
//! | `primes`  | counts primes below N, CPU-bound                            |
//! | `spin`    | loops forever                                               |
//! | `membomb` | allocates memory without end                                |
//! | `fsprobe` | probes its file-system sandbox                              |
//! | `capprobe`| probes files, sockets, env, clock and randomness it is given |
//! | `sleeper` | blocks in one WASI sleep (for density)                      |
//!
//! And the guest-SDK examples in `examples/guest/` (components of the `agora:task` world,
//! wasm32-wasip2 only), through [`guest_task`]: `wordcount_map`, `wordcount_reduce`,
//! `transform`, `progress`, and `wrongworld` (a component of another world, refused).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Which WASI flavour of an example to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A core module exporting `_start` (WASI preview 1).
    P1,
    /// A command component exporting `wasi:cli/run` (WASI preview 2).
    P2,
}

impl Target {
    pub fn triple(self) -> &'static str {
        match self {
            Target::P1 => "wasm32-wasip1",
            Target::P2 => "wasm32-wasip2",
        }
    }
}

/// The names of the example tasks.
pub const TASKS: [&str; 7] = [
    "hello", "primes", "spin", "membomb", "fsprobe", "capprobe", "sleeper",
];

/// The names of the guest-SDK examples.
pub const GUEST_TASKS: [&str; 5] = [
    "wordcount_map",
    "wordcount_reduce",
    "transform",
    "progress",
    "wrongworld",
];

/// The directory holding the task sources.
pub fn sources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tasks")
}

/// The directory holding the guest-SDK examples.
pub fn guest_sources_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

fn target_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join(name)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

fn ensure_rustup_target(triple: &str) -> Result<(), String> {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        // No rustup: the build below reports a missing target itself.
        return Ok(());
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == triple)
    {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", triple])
        .status()
        .map_err(|e| format!("running rustup target add {triple}: {e}"))?;
    if !status.success() {
        return Err(format!("rustup target add {triple} failed ({status})"));
    }
    Ok(())
}

fn build(target: Target) -> Result<PathBuf, String> {
    build_in(&sources_dir(), "wasm-tasks", target)
}

fn build_in(sources: &Path, target_name: &str, target: Target) -> Result<PathBuf, String> {
    ensure_rustup_target(target.triple())?;
    let dir = target_dir(target_name);
    let out = Command::new(cargo())
        .current_dir(sources)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .args(["build", "--quiet", "--release", "--target", target.triple()])
        .arg("--target-dir")
        .arg(&dir)
        .output()
        .map_err(|e| format!("running cargo to build the example tasks: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the example tasks in {} for {} failed:\n{}",
            sources.display(),
            target.triple(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir.join(target.triple()).join("release"))
}

/// Builds every example for `target` (once per process) and returns the path of `name`.
///
/// # Errors
/// When `name` is not an example or the build fails (the message carries cargo's output).
pub fn try_task(name: &str, target: Target) -> Result<PathBuf, String> {
    static P1: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static P2: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if !TASKS.contains(&name) {
        return Err(format!(
            "{name:?} is not an example task; there are {TASKS:?}"
        ));
    }
    let cell = match target {
        Target::P1 => &P1,
        Target::P2 => &P2,
    };
    let dir = cell.get_or_init(|| build(target)).clone()?;
    Ok(dir.join(format!("{name}.wasm")))
}

/// Like [`try_task`], for tests: panics with the build's output when it fails.
pub fn task(name: &str, target: Target) -> PathBuf {
    try_task(name, target).unwrap_or_else(|e| panic!("{e}"))
}

/// Builds the guest-SDK examples (once per process) and returns the path of `name`'s
/// component.
///
/// # Errors
/// When `name` is not one of them or the build fails.
pub fn try_guest_task(name: &str) -> Result<PathBuf, String> {
    static GUEST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if !GUEST_TASKS.contains(&name) {
        return Err(format!(
            "{name:?} is not a guest-SDK example; there are {GUEST_TASKS:?}"
        ));
    }
    let dir = GUEST
        .get_or_init(|| build_in(&guest_sources_dir(), "wasm-guest", Target::P2))
        .clone()?;
    Ok(dir.join(format!("{name}.wasm")))
}

/// A runnable bundle of the guest-SDK example `name` (`wordcount_map`, `transform`, …):
/// its `agora.toml` and `bundle/` files from `examples/guest/<crate>/` beside the built
/// component, assembled under `target/wasm-guest/bundles/<crate>/`.
///
/// # Errors
/// When the build fails or the files cannot be copied.
pub fn try_guest_bundle(name: &str) -> Result<PathBuf, String> {
    let component = try_guest_task(name)?;
    let krate = name.replace('_', "-");
    let src = guest_sources_dir().join(&krate);
    let dir = target_dir("wasm-guest").join("bundles").join(&krate);
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    copy(&src.join("agora.toml"), &dir.join("agora.toml"))?;
    copy(&component, &dir.join(format!("{name}.wasm")))?;
    for e in std::fs::read_dir(src.join("bundle"))
        .into_iter()
        .flatten()
        .flatten()
    {
        copy(&e.path(), &dir.join(e.file_name()))?;
    }
    Ok(dir)
}

/// Like [`try_guest_bundle`], for tests.
pub fn guest_bundle(name: &str) -> PathBuf {
    try_guest_bundle(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`try_guest_task`], for tests.
pub fn guest_task(name: &str) -> PathBuf {
    try_guest_task(name).unwrap_or_else(|e| panic!("{e}"))
}

/// The bytes of a guest-SDK example.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    let path = guest_task(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The bytes of an example task.
pub fn task_bytes(name: &str, target: Target) -> Vec<u8> {
    let path = task(name, target);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
