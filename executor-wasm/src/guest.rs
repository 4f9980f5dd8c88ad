//! The host side of the `agora:task` world (`sdk/wit/task.wit`): what a task component can
//! ask of its host — log lines, progress, messages to its framework — and how its `run`
//! export is called.
//!
//! Everything a guest sends is bounded: log lines and progress messages are cut to a size,
//! progress reports are coalesced (at most one every [`PROGRESS_INTERVAL`]; the last one is
//! always delivered), and messages are limited in size and count. A guest that floods
//! messages faster than they can be delivered is stopped with a trap that says so.

use std::io::Write;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit",
        world: "task",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

pub use bindings::agora::task::host::Level;

/// What a guest tells its host while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestEvent {
    Log { level: Level, message: String },
    Progress { fraction: f32, message: String },
    Message(Vec<u8>),
}

/// Where a run's guest events go.
pub type GuestEvents = mpsc::Sender<GuestEvent>;

/// Longest log line or progress message kept, in bytes.
pub const MAX_TEXT: usize = 16 << 10;
/// Largest message to the framework, in bytes. With the events channel's bound (its
/// capacity is the caller's; 128 in the agent) this caps what a flooding guest holds
/// outside its own memory limit.
pub const MAX_MESSAGE: usize = 256 << 10;
/// Most messages one run may send.
pub const MAX_MESSAGES: u64 = 100_000;
/// Shortest time between two progress reports passed on.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

pub(crate) fn level_name(level: Level) -> &'static str {
    match level {
        Level::Trace => "trace",
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

/// The per-run state behind the host functions.
pub(crate) struct GuestHost {
    /// The task's log (its stderr file).
    pub log: Option<std::fs::File>,
    /// Bytes the log may still take (it shares the stderr file's bound).
    log_left: u64,
    pub events: Option<GuestEvents>,
    last_progress: Option<Instant>,
    pending_progress: Option<(f32, String)>,
    messages: u64,
}

impl GuestHost {
    pub fn new(log: Option<std::fs::File>, events: Option<GuestEvents>, log_max: u64) -> Self {
        GuestHost {
            log,
            log_left: log_max,
            events,
            last_progress: None,
            pending_progress: None,
            messages: 0,
        }
    }

    fn send(&self, e: GuestEvent) -> Result<(), mpsc::error::TrySendError<GuestEvent>> {
        match &self.events {
            Some(tx) => tx.try_send(e),
            None => Ok(()),
        }
    }

    /// Delivers a progress report held back by the rate limit; called when the run ends.
    pub fn flush(&mut self) {
        if let Some((fraction, message)) = self.pending_progress.take() {
            let _ = self.send(GuestEvent::Progress { fraction, message });
        }
    }

    pub fn log(&mut self, level: Level, message: String) {
        let message = cut(message);
        if let Some(f) = &mut self.log {
            let line = format!("[{}] {message}\n", level_name(level));
            // Best effort, like any write to stderr, and bounded like it.
            if (line.len() as u64) <= self.log_left {
                self.log_left -= line.len() as u64;
                let _ = f.write_all(line.as_bytes());
            } else if self.log_left > 0 {
                self.log_left = 0;
                let _ = f.write_all(b"[agora: log truncated: the task's stderr is full]\n");
            }
        }
        let _ = self.send(GuestEvent::Log { level, message });
    }

    pub fn progress(&mut self, fraction: f32, message: String) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let message = cut(message);
        let now = Instant::now();
        if self
            .last_progress
            .is_some_and(|t| now.duration_since(t) < PROGRESS_INTERVAL)
        {
            self.pending_progress = Some((fraction, message));
            return;
        }
        self.last_progress = Some(now);
        self.pending_progress = None;
        let _ = self.send(GuestEvent::Progress { fraction, message });
    }

    pub fn message(&mut self, data: Vec<u8>) -> wasmtime::Result<()> {
        if data.len() > MAX_MESSAGE {
            wasmtime::bail!(
                "the task sent a message of {} bytes; at most {MAX_MESSAGE} are allowed",
                data.len()
            );
        }
        self.messages += 1;
        if self.messages > MAX_MESSAGES {
            wasmtime::bail!("the task sent more than {MAX_MESSAGES} messages");
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.send(GuestEvent::Message(data)) {
            wasmtime::bail!("the task sent messages faster than they could be delivered");
        }
        Ok(())
    }
}
