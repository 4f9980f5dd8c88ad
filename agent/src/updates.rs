//! The status updates of one task, in order, with Mesos's rule: only the oldest
//! unacknowledged update is in flight.
//!
//! ```text
//!  push(update) ──> queued behind the head, or the head itself ──> sent now (if registered)
//!  acknowledge(head's uuid) ──> head dropped ──> the next one is the head ──> sent now
//!  due(now) ──> the head, when its retry time has come (backoff doubles to a bound)
//!  resend(now) ──> the head again, after (re-)registration
//! ```
//!
//! So a framework sees a task's updates in order, each once it has acknowledged the one
//! before: never TASK_RUNNING after TASK_FINISHED. Pure: time is passed in, nothing here
//! sends; the owner task sends what these methods return.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use agora_proto::v1;

/// Timing of the status-update retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

#[derive(Debug)]
struct Pending {
    status: v1::TaskStatus,
    /// When the head is sent again unless acknowledged; set when it becomes the head.
    next_retry: Instant,
    backoff: Duration,
}

/// What an acknowledgement did.
#[derive(Debug, PartialEq)]
pub enum Acked {
    /// It acknowledged the head; the next update, if any, is now in flight (send it).
    /// Boxed: a status is large, and most acknowledgements release none.
    Head(Option<Box<v1::TaskStatus>>),
    /// It matches no update in flight (a duplicate, or one for an update not yet sent).
    Ignored,
}

/// Most updates of one task kept waiting (see [`UpdateQueue::push`]).
pub const MAX_QUEUED: usize = 64;

/// The unacknowledged updates of one task, oldest first.
#[derive(Debug, Default)]
pub struct UpdateQueue {
    pending: VecDeque<Pending>,
}

impl UpdateQueue {
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Every unacknowledged update, oldest first (what the checkpoint keeps).
    pub fn statuses(&self) -> impl Iterator<Item = &v1::TaskStatus> {
        self.pending.iter().map(|p| &p.status)
    }

    /// The update in flight, if any.
    pub fn head(&self) -> Option<&v1::TaskStatus> {
        self.pending.front().map(|p| &p.status)
    }

    /// Queues `status`; returns it to send now when it is the head (nothing else is in
    /// flight), else `None`: it waits for the updates before it to be acknowledged.
    ///
    /// A queue is bounded ([`MAX_QUEUED`]): past that, a new update that is not terminal
    /// replaces the newest waiting one that is not terminal either, so a task reporting
    /// progress faster than its framework acknowledges costs a bounded queue (and a bounded
    /// checkpoint), and only intermediate states are skipped — never the first or the end.
    pub fn push(
        &mut self,
        status: v1::TaskStatus,
        now: Instant,
        retry: &RetryPolicy,
    ) -> Option<v1::TaskStatus> {
        let terminal = |s: &v1::TaskStatus| {
            agora_proto::state_from_proto(s.state()).is_some_and(agora_core::TaskState::is_terminal)
        };
        let queued = self.pending.len();
        if queued >= MAX_QUEUED && !terminal(&status) {
            // Never the head (in flight): the newest waiting update, when it is not an end.
            if let Some(last) = self.pending.back_mut()
                && queued > 1
                && !terminal(&last.status)
            {
                last.status = status;
                return None;
            }
        }
        let head = self.pending.is_empty();
        self.pending.push_back(Pending {
            status,
            next_retry: now + retry.initial,
            backoff: retry.initial,
        });
        head.then(|| self.pending[0].status.clone())
    }

    /// Takes an acknowledgement of `uuid`. Only the head's counts (Mesos ignores others).
    pub fn acknowledge(&mut self, uuid: &[u8], now: Instant, retry: &RetryPolicy) -> Acked {
        if self.pending.front().is_none_or(|p| p.status.uuid != uuid) {
            return Acked::Ignored;
        }
        self.pending.pop_front();
        Acked::Head(self.pending.front_mut().map(|next| {
            next.backoff = retry.initial;
            next.next_retry = now + retry.initial;
            Box::new(next.status.clone())
        }))
    }

    /// The head, when its retry is due at `now`; its backoff doubles (up to `retry.max`).
    pub fn due(&mut self, now: Instant, retry: &RetryPolicy) -> Option<v1::TaskStatus> {
        let head = self.pending.front_mut()?;
        if head.next_retry > now {
            return None;
        }
        head.backoff = (head.backoff * 2).min(retry.max);
        head.next_retry = now + head.backoff;
        Some(head.status.clone())
    }

    /// After (re-)registering: the head again, now carrying `agent_id` (as do those behind
    /// it, for when their turn comes).
    pub fn resend(
        &mut self,
        now: Instant,
        agent_id: Option<&v1::AgentId>,
    ) -> Option<v1::TaskStatus> {
        for p in &mut self.pending {
            p.status.agent_id = agent_id.cloned();
        }
        let head = self.pending.front_mut()?;
        head.next_retry = now + head.backoff;
        Some(head.status.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(40),
        }
    }

    fn update(state: v1::TaskState, uuid: u8) -> v1::TaskStatus {
        v1::TaskStatus {
            state: state as i32,
            uuid: vec![uuid],
            ..Default::default()
        }
    }

    fn state(s: &Option<v1::TaskStatus>) -> Option<v1::TaskState> {
        s.as_ref().map(|s| s.state())
    }

    /// The safety property: a sequence of updates goes out one at a time, each only after
    /// the previous one was acknowledged, so a terminal update is never followed by another.
    #[test]
    fn only_the_oldest_unacknowledged_update_is_in_flight() {
        let (t0, r) = (Instant::now(), policy());
        let mut q = UpdateQueue::default();
        let sent = q.push(update(v1::TaskState::TaskStarting, 1), t0, &r);
        assert_eq!(state(&sent), Some(v1::TaskState::TaskStarting));
        // RUNNING and FINISHED come quickly: they wait behind STARTING.
        assert_eq!(q.push(update(v1::TaskState::TaskRunning, 2), t0, &r), None);
        assert_eq!(q.push(update(v1::TaskState::TaskFinished, 3), t0, &r), None);
        assert_eq!(q.len(), 3);
        // Retries and re-registration send the head only.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(state(&q.due(later, &r)), Some(v1::TaskState::TaskStarting));
        assert_eq!(q.due(later, &r), None, "not again before its backoff");
        assert_eq!(
            state(&q.resend(later, None)),
            Some(v1::TaskState::TaskStarting)
        );
        // An acknowledgement of an update not in flight changes nothing.
        assert_eq!(q.acknowledge(&[3], later, &r), Acked::Ignored);
        assert_eq!(q.len(), 3);
        // Each acknowledgement releases the next, in order.
        let Acked::Head(next) = q.acknowledge(&[1], later, &r) else {
            panic!("the head's acknowledgement counts");
        };
        assert_eq!(state(&next.map(|b| *b)), Some(v1::TaskState::TaskRunning));
        assert_eq!(
            q.acknowledge(&[1], later, &r),
            Acked::Ignored,
            "a duplicate"
        );
        let Acked::Head(next) = q.acknowledge(&[2], later, &r) else {
            panic!()
        };
        assert_eq!(state(&next.map(|b| *b)), Some(v1::TaskState::TaskFinished));
        assert_eq!(q.acknowledge(&[3], later, &r), Acked::Head(None));
        assert!(q.is_empty());
        assert_eq!(q.due(later + Duration::from_secs(3600), &r), None);
    }

    #[test]
    fn the_head_backs_off_and_a_new_head_starts_over() {
        let (t0, r) = (Instant::now(), policy());
        let mut q = UpdateQueue::default();
        q.push(update(v1::TaskState::TaskStarting, 1), t0, &r);
        q.push(update(v1::TaskState::TaskRunning, 2), t0, &r);
        let mut at = t0;
        let mut gaps = Vec::new();
        for _ in 0..4 {
            let next = (1..=100)
                .map(|s| at + Duration::from_secs(s))
                .find(|t| q.due(*t, &r).is_some())
                .unwrap();
            gaps.push((next - at).as_secs());
            at = next;
        }
        assert_eq!(gaps, [10, 20, 40, 40], "doubling up to the bound");
        // RUNNING, now the head, is due after the initial interval, not the grown one.
        assert!(matches!(q.acknowledge(&[1], at, &r), Acked::Head(Some(_))));
        assert_eq!(q.due(at + Duration::from_secs(9), &r), None);
        assert_eq!(
            state(&q.due(at + Duration::from_secs(10), &r)),
            Some(v1::TaskState::TaskRunning)
        );
    }

    #[test]
    fn a_flood_of_progress_is_bounded_and_keeps_the_first_and_the_end() {
        let (t0, r) = (Instant::now(), policy());
        let mut q = UpdateQueue::default();
        q.push(update(v1::TaskState::TaskStarting, 0), t0, &r);
        for i in 1..=200u8 {
            q.push(update(v1::TaskState::TaskRunning, i), t0, &r);
        }
        assert_eq!(q.len(), MAX_QUEUED);
        q.push(update(v1::TaskState::TaskFinished, 255), t0, &r);
        let states: Vec<_> = q.statuses().map(v1::TaskStatus::state).collect();
        assert_eq!(states[0], v1::TaskState::TaskStarting, "the head stays");
        assert_eq!(
            *states.last().unwrap(),
            v1::TaskState::TaskFinished,
            "the end is kept"
        );
        assert!(q.len() <= MAX_QUEUED + 1);
        // The newest progress survived the coalescing, just before the end.
        assert_eq!(q.statuses().nth(q.len() - 2).unwrap().uuid, vec![200]);
    }

    #[test]
    fn resending_stamps_the_agent_id_on_every_update() {
        let (t0, r) = (Instant::now(), policy());
        let mut q = UpdateQueue::default();
        q.push(update(v1::TaskState::TaskStarting, 1), t0, &r);
        q.push(update(v1::TaskState::TaskRunning, 2), t0, &r);
        let id = v1::AgentId { value: "a1".into() };
        let head = q.resend(t0, Some(&id)).unwrap();
        assert_eq!(head.agent_id.as_ref(), Some(&id));
        let Acked::Head(Some(next)) = q.acknowledge(&[1], t0, &r) else {
            panic!()
        };
        assert_eq!(next.agent_id.as_ref(), Some(&id));
    }
}
