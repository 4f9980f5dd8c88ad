//! Write Agora tasks in Rust.
//!
//! A task is a WebAssembly component of the `agora:task` world (`sdk/wit/task.wit`): the
//! agent calls its `run` with the task's input bytes; while it works it may [`log`], report
//! [`progress`] to its framework and send it [`message`]s; what `run` returns is the task's
//! output (in the final TASK_FINISHED update and the sandbox's `output` file), or its error
//! (TASK_FAILED). Standard WASI works too (`println!`, files, clocks) as far as the task's
//! capabilities allow.
//!
//! ```ignore
//! struct Shout;
//!
//! impl agora_guest::Task for Shout {
//!     fn run(input: Vec<u8>) -> Result<Vec<u8>, String> {
//!         agora_guest::info("shouting");
//!         let text = String::from_utf8(input).map_err(|e| e.to_string())?;
//!         agora_guest::progress(1.0, "done");
//!         Ok(text.to_uppercase().into_bytes())
//!     }
//! }
//!
//! agora_guest::export_task!(Shout);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`); the
//! `.wasm` in `target/wasm32-wasip2/release/` is the component to run.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "task",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_task_world",
        default_bindings_module: "agora_guest::bindings",
    });
}

pub use bindings::agora::task::host::Level;

/// What a task implements: its `run`.
pub use bindings::Guest as Task;

/// Exports a type implementing [`Task`] as the component's `run`.
#[macro_export]
macro_rules! export_task {
    ($task:ident) => {
        $crate::bindings::__export_task_world!($task);
    };
}

/// A line in the task's log (its stderr), at `level`.
pub fn log(level: Level, message: &str) {
    bindings::agora::task::host::log(level, message);
}

pub fn debug(message: &str) {
    log(Level::Debug, message);
}

pub fn info(message: &str) {
    log(Level::Info, message);
}

pub fn warn(message: &str) {
    log(Level::Warn, message);
}

pub fn error(message: &str) {
    log(Level::Error, message);
}

/// Tells the framework how far the task has come (0.0 to 1.0) and what it is doing. Reports
/// closer together than 100 ms are coalesced; the last one always arrives.
pub fn progress(fraction: f32, message: &str) {
    bindings::agora::task::host::progress(fraction, message);
}

/// Sends bytes to the task's framework (at most 256 KiB each; a task that sends faster than
/// they can be delivered is stopped).
pub fn message(data: &[u8]) {
    bindings::agora::task::host::message(data);
}
