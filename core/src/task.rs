//! The task state machine.
//!
//! ```text
//!   STAGING ──> STARTING ──> RUNNING ──> KILLING
//!      │            │           │           │
//!      └────────────┴─────┬─────┴───────────┘
//!                         v
//!   terminal: FINISHED FAILED KILLED ERROR LOST DROPPED GONE
//!
//!   any live state ──> UNREACHABLE ──> (back to) STARTING | RUNNING | KILLING, or terminal
//! ```
//!
//! A live task may repeat its state (a RUNNING update carrying new data); a terminal task never
//! changes again. UNKNOWN is only an answer to reconciliation, never a task's own state.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskState {
    Staging,
    Starting,
    Running,
    Killing,
    Finished,
    Failed,
    Killed,
    Error,
    Lost,
    Dropped,
    Unreachable,
    Gone,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task cannot go from {from} to {to}")]
pub struct TransitionError {
    pub from: TaskState,
    pub to: TaskState,
}

impl TaskState {
    pub const ALL: [TaskState; 13] = [
        TaskState::Staging,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Killing,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Killed,
        TaskState::Error,
        TaskState::Lost,
        TaskState::Dropped,
        TaskState::Unreachable,
        TaskState::Gone,
        TaskState::Unknown,
    ];

    /// Terminal states end the task: its resources are released and it never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished
                | TaskState::Failed
                | TaskState::Killed
                | TaskState::Error
                | TaskState::Lost
                | TaskState::Dropped
                | TaskState::Gone
        )
    }

    /// True when the task may hold resources on an agent.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            TaskState::Staging
                | TaskState::Starting
                | TaskState::Running
                | TaskState::Killing
                | TaskState::Unreachable
        )
    }

    /// Whether a task in `self` may move to `to`.
    pub fn can_transition(self, to: TaskState) -> bool {
        use TaskState::*;
        if to == Unknown || self == Unknown || self.is_terminal() {
            return false;
        }
        if to.is_terminal() || to == Unreachable {
            return true;
        }
        match self {
            Staging => matches!(to, Staging | Starting | Running | Killing),
            Starting => matches!(to, Starting | Running | Killing),
            Running => matches!(to, Running | Killing),
            Killing => matches!(to, Killing),
            // An agent that comes back reports its tasks as they are now.
            Unreachable => matches!(to, Starting | Running | Killing),
            _ => false,
        }
    }

    /// Moves to `to` if the state machine allows it.
    ///
    /// # Errors
    /// When the transition is not legal.
    pub fn transition(self, to: TaskState) -> Result<TaskState, TransitionError> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self, to })
        }
    }

    /// The Mesos name, e.g. `TASK_RUNNING`.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Staging => "TASK_STAGING",
            TaskState::Starting => "TASK_STARTING",
            TaskState::Running => "TASK_RUNNING",
            TaskState::Killing => "TASK_KILLING",
            TaskState::Finished => "TASK_FINISHED",
            TaskState::Failed => "TASK_FAILED",
            TaskState::Killed => "TASK_KILLED",
            TaskState::Error => "TASK_ERROR",
            TaskState::Lost => "TASK_LOST",
            TaskState::Dropped => "TASK_DROPPED",
            TaskState::Unreachable => "TASK_UNREACHABLE",
            TaskState::Gone => "TASK_GONE",
            TaskState::Unknown => "TASK_UNKNOWN",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::TaskState::*;
    use super::*;

    #[test]
    fn the_usual_life() {
        let s = Staging
            .transition(Starting)
            .and_then(|s| s.transition(Running))
            .and_then(|s| s.transition(Finished))
            .unwrap();
        assert_eq!(s, Finished);
    }

    #[test]
    fn terminal_states_never_change() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in TaskState::ALL {
                assert!(!from.can_transition(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn no_going_back() {
        assert_eq!(
            Running.transition(Starting).unwrap_err().to_string(),
            "task cannot go from TASK_RUNNING to TASK_STARTING"
        );
        assert!(!Running.can_transition(Staging));
        assert!(!Killing.can_transition(Running));
    }

    #[test]
    fn every_live_state_can_end_or_become_unreachable() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_live()) {
            assert!(from.can_transition(Unreachable));
            for to in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
                assert!(from.can_transition(to), "{from} -> {to}");
            }
        }
        assert!(Unreachable.can_transition(Running));
    }

    #[test]
    fn unknown_is_only_an_answer() {
        for s in TaskState::ALL {
            assert!(!s.can_transition(Unknown));
            assert!(!Unknown.can_transition(s));
        }
    }
}
