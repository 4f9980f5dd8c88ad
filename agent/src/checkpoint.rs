//! The agent's checkpoint: what a restarted agent needs to carry on, in one redb file,
//! `WORK_DIR/meta/agent.redb` (the directory 0700, the file 0600), every write one durable
//! (fsync'd) transaction.
//!
//! ```text
//!  meta       "agent_id" → the id the master gave     "info" → the AgentInfo it registered
//!  frameworks "FW"       → its FrameworkInfo, while it has tasks here
//!  tasks      "FW/TASK"  → info, state, isolation, unacknowledged updates, attachment
//!  executors  "FW/EXEC"  → token, info, resources, how to find its process again
//! ```
//!
//! The owner task writes a turn's task and framework changes in one transaction before it sends or
//! launches anything of that turn ([`crate::state`]); the executor containerizer writes an
//! executor's record before its process starts and removes it once the process has ended.
//! Ids never contain `/` ([`agora_core`] checks them), so the keys are unambiguous.

use std::path::{Path, PathBuf};

use agora_core::{AgentId, ExecutorId, FrameworkId, TaskId, TaskState};
use agora_proto::{state_from_proto, state_to_proto, v1};
use prost::Message;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::state::{Attachment, ProcessRecord, TaskKey};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FRAMEWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("frameworks");
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const EXECUTORS: TableDefinition<&str, &[u8]> = TableDefinition::new("executors");

/// The directory under the work directory, and the file in it.
pub const DIR: &str = "meta";
pub const FILE: &str = "agent.redb";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "the agent's checkpoint {path} is held by another process (is another agent running on this work directory?)"
    )]
    InUse { path: PathBuf },
    #[error(
        "the agent's checkpoint {path} cannot be read: {detail}. Start the agent with --recover=cleanup to end what the previous agent left running and start afresh"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("writing the agent's checkpoint {path}: {detail}")]
    Write { path: PathBuf, detail: String },
}

/// A task as checkpointed.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTask {
    pub info: v1::TaskInfo,
    pub state: TaskState,
    pub isolation: String,
    /// Unacknowledged updates, oldest first.
    pub pending: Vec<v1::TaskStatus>,
    pub attachment: Option<Attachment>,
    /// See [`crate::state::Task::origins`].
    pub origins: Vec<u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TaskRow {
    info: Vec<u8>,
    state: i32,
    isolation: String,
    pending: Vec<Vec<u8>>,
    attachment: Option<Attachment>,
    origins: Vec<u64>,
}

/// An executor as checkpointed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedExecutor {
    pub token: String,
    /// The encoded `ExecutorInfo`.
    pub info: Vec<u8>,
    pub process: Option<ProcessRecord>,
}

/// What a previous run of the agent left.
#[derive(Debug, Default)]
pub struct Saved {
    pub agent_id: Option<AgentId>,
    pub info: Option<v1::AgentInfo>,
    pub frameworks: Vec<(FrameworkId, v1::FrameworkInfo)>,
    pub tasks: Vec<(TaskKey, SavedTask)>,
    pub executors: Vec<((FrameworkId, ExecutorId), SavedExecutor)>,
}

impl Saved {
    pub fn is_empty(&self) -> bool {
        self.agent_id.is_none() && self.tasks.is_empty() && self.executors.is_empty()
    }
}

/// One change of a task's record.
pub enum TaskWrite<'a> {
    Put(&'a TaskKey, &'a crate::state::Task),
    Remove(&'a TaskKey),
}

/// One change of a framework's record: its info, or `None` for its absence.
pub type FrameworkWrite<'a> = (&'a FrameworkId, Option<&'a v1::FrameworkInfo>);

/// The open checkpoint. Cheap to share (`Arc`); writes are serialized by redb.
pub struct Checkpoint {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .finish()
    }
}

fn key(a: &str, b: &str) -> String {
    format!("{a}/{b}")
}

impl Checkpoint {
    /// Opens (or creates) the checkpoint under `work_dir` and reads everything in it.
    ///
    /// # Errors
    /// When another process holds it, or it cannot be read.
    pub fn open(work_dir: &Path) -> Result<(Checkpoint, Saved), CheckpointError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = work_dir.join(DIR);
        let path = dir.join(FILE);
        // Root's (the agent's) alone: it holds executors' tokens and tasks' environments, and
        // a task that could open it could also lock the next agent out of it.
        let private = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)));
        if let Err(e) = private {
            return Err(CheckpointError::Damaged {
                path: dir,
                detail: format!("preparing the directory: {e}"),
            });
        }
        let damaged = |detail: String| CheckpointError::Damaged {
            path: path.clone(),
            detail,
        };
        let db = match redb::Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(CheckpointError::InUse { path });
            }
            Err(e) => return Err(damaged(e.to_string())),
        };
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let saved = Checkpoint::read(&db).map_err(damaged)?;
        let cp = Checkpoint { db, path };
        Ok((cp, saved))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(db: &redb::Database) -> Result<Saved, String> {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let mut saved = Saved::default();
        match txn.open_table(META) {
            Ok(meta) => {
                if let Some(v) = meta.get("agent_id").map_err(|e| e.to_string())? {
                    let id = String::from_utf8(v.value().to_vec()).map_err(|e| e.to_string())?;
                    saved.agent_id =
                        Some(AgentId::new(id).map_err(|e| format!("the agent id: {e}"))?);
                }
                if let Some(v) = meta.get("info").map_err(|e| e.to_string())? {
                    saved.info = Some(
                        v1::AgentInfo::decode(v.value())
                            .map_err(|e| format!("the agent's info: {e}"))?,
                    );
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        match txn.open_table(FRAMEWORKS) {
            Ok(frameworks) => {
                for row in frameworks.iter().map_err(|e| e.to_string())? {
                    let (k, v) = row.map_err(|e| e.to_string())?;
                    let k = k.value();
                    let parsed = (|| {
                        let fw = FrameworkId::new(k).map_err(|e| e.to_string())?;
                        let info =
                            v1::FrameworkInfo::decode(v.value()).map_err(|e| e.to_string())?;
                        Ok::<_, String>((fw, info))
                    })()
                    .map_err(|e| format!("framework {k:?}: {e}"))?;
                    saved.frameworks.push(parsed);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        match txn.open_table(TASKS) {
            Ok(tasks) => {
                for row in tasks.iter().map_err(|e| e.to_string())? {
                    let (k, v) = row.map_err(|e| e.to_string())?;
                    let k = k.value();
                    let parsed = (|| {
                        let (fw, task) = k.split_once('/').ok_or("no '/' in the key")?;
                        let fw = FrameworkId::new(fw).map_err(|e| e.to_string())?;
                        let task = TaskId::new(task).map_err(|e| e.to_string())?;
                        let row: TaskRow =
                            postcard::from_bytes(v.value()).map_err(|e| e.to_string())?;
                        let state = v1::TaskState::try_from(row.state)
                            .ok()
                            .and_then(state_from_proto)
                            .ok_or_else(|| format!("state {}", row.state))?;
                        let pending = row
                            .pending
                            .iter()
                            .map(|b| v1::TaskStatus::decode(b.as_slice()))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((
                            (fw, task),
                            SavedTask {
                                info: v1::TaskInfo::decode(row.info.as_slice())
                                    .map_err(|e| e.to_string())?,
                                state,
                                isolation: row.isolation,
                                pending,
                                attachment: row.attachment,
                                origins: row.origins,
                            },
                        ))
                    })()
                    .map_err(|e| format!("task {k:?}: {e}"))?;
                    saved.tasks.push(parsed);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        match txn.open_table(EXECUTORS) {
            Ok(execs) => {
                for row in execs.iter().map_err(|e| e.to_string())? {
                    let (k, v) = row.map_err(|e| e.to_string())?;
                    let k = k.value();
                    let parsed = (|| {
                        let (fw, ex) = k.split_once('/').ok_or("no '/' in the key")?;
                        let fw = FrameworkId::new(fw).map_err(|e| e.to_string())?;
                        let ex = ExecutorId::new(ex).map_err(|e| e.to_string())?;
                        let row: SavedExecutor =
                            postcard::from_bytes(v.value()).map_err(|e| e.to_string())?;
                        Ok::<_, String>(((fw, ex), row))
                    })()
                    .map_err(|e| format!("executor {k:?}: {e}"))?;
                    saved.executors.push(parsed);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        Ok(saved)
    }

    fn write_err(&self, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Write {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    /// Writes the agent's id and info (when given), the framework and the task changes in
    /// one durable transaction.
    ///
    /// # Errors
    /// When the transaction cannot be committed (the disk is full, the file is gone).
    pub fn write(
        &self,
        identity: Option<(&AgentId, &v1::AgentInfo)>,
        frameworks: &[FrameworkWrite<'_>],
        tasks: &[TaskWrite<'_>],
    ) -> Result<(), CheckpointError> {
        let txn = self.db.begin_write().map_err(|e| self.write_err(e))?;
        {
            if let Some((id, info)) = identity {
                let mut meta = txn.open_table(META).map_err(|e| self.write_err(e))?;
                meta.insert("agent_id", id.as_str().as_bytes())
                    .map_err(|e| self.write_err(e))?;
                meta.insert("info", info.encode_to_vec().as_slice())
                    .map_err(|e| self.write_err(e))?;
            }
            if !frameworks.is_empty() {
                let mut table = txn.open_table(FRAMEWORKS).map_err(|e| self.write_err(e))?;
                for (fw, info) in frameworks {
                    match info {
                        Some(info) => table
                            .insert(fw.as_str(), info.encode_to_vec().as_slice())
                            .map(drop),
                        None => table.remove(fw.as_str()).map(drop),
                    }
                    .map_err(|e| self.write_err(e))?;
                }
            }
            let mut table = txn.open_table(TASKS).map_err(|e| self.write_err(e))?;
            for w in tasks {
                match w {
                    TaskWrite::Put((fw, task), t) => {
                        let row = TaskRow {
                            info: t.info.encode_to_vec(),
                            state: state_to_proto(t.state) as i32,
                            isolation: t.isolation.clone(),
                            pending: t.pending.statuses().map(Message::encode_to_vec).collect(),
                            attachment: t.attachment.clone(),
                            origins: t.origins.iter().copied().collect(),
                        };
                        let bytes = postcard::to_stdvec(&row).map_err(|e| self.write_err(e))?;
                        table
                            .insert(key(fw.as_str(), task.as_str()).as_str(), bytes.as_slice())
                            .map_err(|e| self.write_err(e))?;
                    }
                    TaskWrite::Remove((fw, task)) => {
                        table
                            .remove(key(fw.as_str(), task.as_str()).as_str())
                            .map_err(|e| self.write_err(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.write_err(e))
    }

    /// Records an executor (`Some`) or its end (`None`).
    ///
    /// # Errors
    /// When the transaction cannot be committed.
    pub fn write_executor(
        &self,
        fw: &FrameworkId,
        executor: &ExecutorId,
        record: Option<&SavedExecutor>,
    ) -> Result<(), CheckpointError> {
        let txn = self.db.begin_write().map_err(|e| self.write_err(e))?;
        {
            let mut table = txn.open_table(EXECUTORS).map_err(|e| self.write_err(e))?;
            let k = key(fw.as_str(), executor.as_str());
            match record {
                Some(r) => {
                    let bytes = postcard::to_stdvec(r).map_err(|e| self.write_err(e))?;
                    table
                        .insert(k.as_str(), bytes.as_slice())
                        .map_err(|e| self.write_err(e))?;
                }
                None => {
                    table.remove(k.as_str()).map_err(|e| self.write_err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.write_err(e))
    }

    /// Forgets everything (after `--recover=cleanup` ended it all).
    ///
    /// # Errors
    /// When the transaction cannot be committed.
    pub fn wipe(&self) -> Result<(), CheckpointError> {
        let txn = self.db.begin_write().map_err(|e| self.write_err(e))?;
        for t in [META, FRAMEWORKS, TASKS, EXECUTORS] {
            match txn.delete_table(t) {
                Ok(_) => {}
                Err(e) => return Err(self.write_err(e)),
            }
        }
        txn.commit().map_err(|e| self.write_err(e))
    }
}

/// Runs `write` (a durable commit: an fsync) where it does not hold up other tasks: on a
/// multi-threaded runtime the worker hands its other tasks over first.
pub fn off_the_runtime<T>(write: impl FnOnce() -> T) -> T {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(write)
    } else {
        write()
    }
}

/// How this agent's configuration differs from the one its checkpoint was made with, if it
/// does in a way recovery cannot follow: its host name, attributes, or resources (a `disk`
/// the agent detected from free space may change).
/// With `executors` (some were left running), its address too: they dial the old one.
pub fn mismatch(
    saved: &v1::AgentInfo,
    now: &v1::AgentInfo,
    disk_detected: bool,
    executors: bool,
) -> Option<String> {
    let mut diffs = Vec::new();
    if executors && saved.endpoint != now.endpoint {
        diffs.push(format!(
            "its address was {}, is now {} (the executors it left running dial the old one)",
            saved.endpoint, now.endpoint
        ));
    }
    if saved.hostname != now.hostname {
        diffs.push(format!(
            "hostname was {:?}, is now {:?}",
            saved.hostname, now.hostname
        ));
    }
    let attrs = |i: &v1::AgentInfo| {
        agora_proto::attributes_from_proto(&i.attributes)
            .map(|a| {
                a.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(";")
            })
            .unwrap_or_else(|e| format!("unreadable ({e})"))
    };
    let (was, is) = (attrs(saved), attrs(now));
    if was != is {
        diffs.push(format!("attributes were {was:?}, are now {is:?}"));
    }
    let res = |i: &v1::AgentInfo| {
        agora_proto::resources_from_proto(&i.resources)
            .map(|r| {
                r.iter()
                    .filter(|r| !(disk_detected && r.name == "disk"))
                    .collect::<agora_core::Resources>()
                    .to_string()
            })
            .unwrap_or_else(|e| format!("unreadable ({e})"))
    };
    let (was, is) = (res(saved), res(now));
    if was != is {
        diffs.push(format!("resources were {was:?}, are now {is:?}"));
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Task;
    use crate::updates::{RetryPolicy, UpdateQueue};
    use std::time::{Duration, Instant};

    #[test]
    fn tasks_and_their_updates_survive_a_reopen_and_removals_stick() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, saved) = Checkpoint::open(dir.path()).unwrap();
        assert!(saved.is_empty());
        let retry = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(2),
        };
        let mut pending = UpdateQueue::default();
        for (i, s) in [v1::TaskState::TaskRunning, v1::TaskState::TaskFinished]
            .into_iter()
            .enumerate()
        {
            pending.push(
                v1::TaskStatus {
                    state: s as i32,
                    uuid: vec![i as u8],
                    exit_code: Some(3),
                    ..Default::default()
                },
                Instant::now(),
                &retry,
            );
        }
        let task = Task {
            info: v1::TaskInfo {
                name: "t".into(),
                ..Default::default()
            },
            state: TaskState::Finished,
            isolation: "wasm".into(),
            pending,
            attachment: Some(Attachment::Executor("agora-wasm".into())),
            origins: Default::default(),
        };
        let k1 = (FrameworkId::new("fw").unwrap(), TaskId::new("a").unwrap());
        let k2 = (FrameworkId::new("fw").unwrap(), TaskId::new("b").unwrap());
        let id = AgentId::new("m-A1").unwrap();
        let info = v1::AgentInfo {
            hostname: "h".into(),
            ..Default::default()
        };
        let (fw, other) = (k1.0.clone(), FrameworkId::new("other").unwrap());
        let fw_info = v1::FrameworkInfo {
            name: "batch".into(),
            user: "nobody".into(),
            ..Default::default()
        };
        cp.write(
            Some((&id, &info)),
            &[(&fw, Some(&fw_info)), (&other, Some(&fw_info))],
            &[TaskWrite::Put(&k1, &task), TaskWrite::Put(&k2, &task)],
        )
        .unwrap();
        cp.write(None, &[(&other, None)], &[TaskWrite::Remove(&k2)])
            .unwrap();
        let exec = SavedExecutor {
            token: "secret".into(),
            info: vec![1, 2],
            process: None,
        };
        let ek = (
            FrameworkId::new("fw").unwrap(),
            ExecutorId::new("e").unwrap(),
        );
        cp.write_executor(&ek.0, &ek.1, Some(&exec)).unwrap();
        drop(cp);

        let (cp, saved) = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(saved.agent_id, Some(id));
        assert_eq!(saved.info, Some(info));
        assert_eq!(saved.frameworks, vec![(fw, fw_info)]);
        assert_eq!(saved.tasks.len(), 1);
        let (k, t) = &saved.tasks[0];
        assert_eq!(k, &k1);
        assert_eq!(t.state, TaskState::Finished);
        assert_eq!(
            t.pending.iter().map(|s| s.uuid[0]).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(t.pending[1].exit_code, Some(3));
        assert_eq!(saved.executors, vec![(ek, exec)]);
        cp.wipe().unwrap();
        drop(cp);
        let (_cp, saved) = Checkpoint::open(dir.path()).unwrap();
        assert!(saved.is_empty());
    }

    #[test]
    fn a_damaged_checkpoint_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(DIR)).unwrap();
        std::fs::write(
            dir.path().join(DIR).join(FILE),
            b"not a database at all, just bytes",
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CheckpointError::Damaged { .. }), "{msg}");
        assert!(
            msg.contains("agent.redb") && msg.contains("--recover=cleanup"),
            "{msg}"
        );
    }

    #[test]
    fn a_changed_configuration_is_named() {
        let info = |host: &str, res: &str| v1::AgentInfo {
            hostname: host.into(),
            resources: agora_proto::resources_to_proto(&agora_core::parse_resources(res).unwrap()),
            ..Default::default()
        };
        let a = info("h", "cpus:2;mem:512;disk:100");
        assert_eq!(mismatch(&a, &a, false, false), None);
        assert_eq!(
            mismatch(&a, &info("h", "cpus:2;mem:512;disk:90"), true, false),
            None
        );
        let m = mismatch(&a, &info("h", "cpus:4;mem:512;disk:100"), false, false).unwrap();
        assert!(m.contains("resources") && m.contains("cpus:4"), "{m}");
        let m = mismatch(&a, &info("g", "cpus:2;mem:512;disk:100"), false, false).unwrap();
        assert!(m.contains("hostname"), "{m}");
        let mut moved = a.clone();
        moved.endpoint = "http://127.0.0.1:2".into();
        assert_eq!(mismatch(&a, &moved, false, false), None);
        let m = mismatch(&a, &moved, false, true).unwrap();
        assert!(m.contains("address") && m.contains("127.0.0.1:2"), "{m}");
    }
}
