//! What a test's framework has been told of its tasks, read from its event stream.

use std::collections::HashMap;

use agora_core::TaskState;
use agora_proto::v1;

use crate::*;

/// The latest status of each task, and every end the framework heard of it.
#[derive(Default)]
pub(crate) struct Seen {
    pub latest: HashMap<String, v1::TaskStatus>,
    /// Per task, each distinct terminal report: (state, uuid). A repeat of one update (same
    /// uuid) is one entry; reconciliation's answers have no uuid (they repeat the latest
    /// state, they are not updates).
    pub ends: HashMap<String, Vec<(TaskState, Vec<u8>)>>,
}

impl Seen {
    pub fn note(&mut self, st: v1::TaskStatus) {
        let id = st.task_id.as_ref().unwrap().value.clone();
        let state = state_of(&st);
        if state.is_terminal() {
            let ends = self.ends.entry(id.clone()).or_default();
            let end = (state, st.uuid.clone());
            if !ends.contains(&end) {
                ends.push(end);
            }
        }
        self.latest.insert(id, st);
    }

    pub fn state(&self, task: &str) -> Option<TaskState> {
        self.latest.get(task).map(state_of)
    }

    /// Notes an update, or declines offers not needed now, so that later ones come.
    pub async fn take(&mut self, s: &Scheduler, ev: Event) {
        match ev {
            Event::Update(st) => self.note(st),
            Event::Offers(o) => decline_all(s, &o).await,
            _ => {}
        }
    }

    /// Reads events until `until` holds, declining offers.
    pub async fn pump(
        &mut self,
        s: &Scheduler,
        events: &mut Events,
        what: &str,
        until: impl Fn(&Seen) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !until(self) {
            let ev = tokio::time::timeout_at(deadline, events.next())
                .await
                .unwrap_or_else(|_| {
                    let states: HashMap<_, _> = self
                        .latest
                        .iter()
                        .map(|(k, v)| (k.clone(), (state_of(v), v.message.clone())))
                        .collect();
                    panic!("timed out waiting for {what}: {states:?}")
                })
                .expect("the event stream ended");
            self.take(s, ev).await;
        }
    }
}

/// Declines `offers` without a filter, so that they come back at once when needed.
pub(crate) async fn decline_all(s: &Scheduler, offers: &[v1::Offer]) {
    let ids: Vec<v1::OfferId> = offers.iter().filter_map(|o| o.id.clone()).collect();
    // A refusal by a master that no longer leads is fine: its offers are gone anyway.
    let _ = s.decline(&ids, Some(0.0)).await;
}
