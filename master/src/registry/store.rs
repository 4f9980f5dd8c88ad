//! The registry's durable store: openraft's log and the applied state in one redb file.
//!
//! Every value carries a checksum of its bytes, checked whenever it is read and, for the
//! whole file, when the store opens: a damaged store is refused with an error that names
//! what is damaged, never read as if it were empty. Writes that openraft is told are done
//! are on disk first (redb commits with `Durability::Immediate`, one fsync each); the
//! applied state and the id of the last entry applied change in one transaction, so a crash
//! between them cannot apply an entry twice.
//!
//! Tables:
//! - `log`: index → entry.
//! - `meta`: `vote`, `committed`, `purged` (the last log id removed by compaction).
//! - `state`: `applied`, `membership`, `epoch`, `removed_next`, and one row per record:
//!   `a/ID` agents, `f/ID` frameworks, `r/ROLE` roles, `x/ID` removed frameworks (the value
//!   is its sequence number, which orders them).
//! - `snapshot`: `meta` and `data` of the latest snapshot.

// openraft's traits fix the error type (`StorageError`, large); our helpers return it too.
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Digest;

use super::state::{Registry, Touched};
use super::{Applied, NodeId, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const SUM: usize = 8;

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the registry store {path} is damaged ({what}); it was not opened. Restore it from a \
         backup, or remove it to join the group anew and copy the registry from the other \
         masters (a lone master would then start empty)"
    )]
    Damaged { path: String, what: String },
    #[error(
        "the registry store {path} is in use by another process (another master on the same work directory?)"
    )]
    InUse { path: String },
    #[error("the registry store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: Box<redb::Error>,
    },
}

/// The checksum of a row: its key and its value, so that a damaged key is caught too.
fn sum(key: &[u8], bytes: &[u8]) -> [u8; SUM] {
    let mut h = sha2::Sha256::new();
    h.update((key.len() as u64).to_le_bytes());
    h.update(key);
    h.update(bytes);
    let d = h.finalize();
    let mut out = [0u8; SUM];
    out.copy_from_slice(&d[..SUM]);
    out
}

/// A row's stored value: checksum, then the value in postcard.
pub(super) fn seal<T: Serialize>(key: impl AsRef<[u8]>, v: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(v).expect("serializing to memory does not fail");
    let mut out = Vec::with_capacity(SUM + body.len());
    out.extend_from_slice(&sum(key.as_ref(), &body));
    out.extend_from_slice(&body);
    out
}

/// Checks a value's checksum and decodes it; the error says what was wrong.
fn open_sealed<T: DeserializeOwned>(key: impl AsRef<[u8]>, bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < SUM {
        return Err(format!("a value of {} bytes is too short", bytes.len()));
    }
    let (s, body) = bytes.split_at(SUM);
    if s != sum(key.as_ref(), body) {
        return Err("a value fails its checksum".into());
    }
    postcard::from_bytes(body).map_err(|e| format!("a value does not decode: {e}"))
}

fn io_err(e: impl Into<redb::Error>) -> StorageError<NodeId> {
    let e: redb::Error = e.into();
    StorageIOError::write(&e).into()
}

fn read_err(what: impl std::fmt::Display) -> StorageError<NodeId> {
    let e = std::io::Error::other(what.to_string());
    StorageIOError::read(&e).into()
}

/// The redb file shared by the log and the state machine.
#[derive(Clone)]
pub struct Store {
    db: Arc<redb::Database>,
    /// The state as applied, for the leader to read at the start of its term.
    state: Arc<RwLock<Registry>>,
    /// The voters of the latest membership entry in the log when the store opened.
    logged_voters: Option<BTreeSet<NodeId>>,
}

impl Store {
    /// Opens (or creates) the store at `path`, or an empty one in memory with `None`, and
    /// checks every value in it.
    ///
    /// # Errors
    /// When the file cannot be opened or anything in it is damaged.
    pub fn open(path: Option<&Path>) -> Result<Store, StoreError> {
        let shown = path.map_or_else(|| "(in memory)".to_owned(), |p| p.display().to_string());
        let io = |e: redb::Error| StoreError::Io {
            path: shown.clone(),
            source: Box::new(e),
        };
        let damaged = |what: String| StoreError::Damaged {
            path: shown.clone(),
            what,
        };
        let db = match path {
            None => redb::Builder::new()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| io(e.into()))?,
            Some(p) => {
                // redb makes a new database of an empty file: one that exists but holds
                // nothing was truncated, not created by us.
                if let Ok(meta) = std::fs::metadata(p)
                    && meta.len() == 0
                {
                    return Err(damaged("the file is empty".into()));
                }
                // A store held by a master that is stopping is let go within moments; one
                // held longer belongs to another master on the same work directory.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                let opened = loop {
                    match redb::Database::create(p) {
                        Err(redb::DatabaseError::DatabaseAlreadyOpen)
                            if std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                            return Err(StoreError::InUse {
                                path: shown.clone(),
                            });
                        }
                        other => break other,
                    }
                };
                opened.map_err(|e| match e {
                    redb::DatabaseError::Storage(redb::StorageError::Corrupted(what)) => {
                        damaged(what)
                    }
                    redb::DatabaseError::Storage(redb::StorageError::Io(ref io_e))
                        if io_e.kind() == std::io::ErrorKind::InvalidData
                            || io_e.kind() == std::io::ErrorKind::UnexpectedEof =>
                    {
                        damaged(e.to_string())
                    }
                    other => io(other.into()),
                })?
            }
        };
        let db = Arc::new(db);
        // Create the tables, so that readers find them.
        {
            let txn = db.begin_write().map_err(|e| io(e.into()))?;
            for t in [META, STATE, SNAPSHOT] {
                txn.open_table(t).map_err(|e| io(e.into()))?;
            }
            txn.open_table(LOG).map_err(|e| io(e.into()))?;
            txn.commit().map_err(|e| io(e.into()))?;
        }
        let (registry, logged_voters) = verify(&db).map_err(|e| match e {
            Verify::Damaged(what) => damaged(what),
            Verify::Io(e) => io(e),
        })?;
        Ok(Store {
            db,
            state: Arc::new(RwLock::new(registry)),
            logged_voters,
        })
    }

    /// The registry as applied so far.
    pub fn registry(&self) -> Registry {
        self.state.read().expect("registry lock").clone()
    }

    /// The voters of the latest membership entry the log held when the store opened.
    pub fn logged_voters(&self) -> Option<&BTreeSet<NodeId>> {
        self.logged_voters.as_ref()
    }

    /// Whether every handle on the file has gone (as seen when called later).
    pub fn closed(&self) -> impl Fn() -> bool + use<> {
        let weak = Arc::downgrade(&self.db);
        move || weak.strong_count() == 0
    }

    /// The log reader and storage openraft drives.
    pub fn log_store(&self) -> LogStore {
        LogStore {
            store: self.clone(),
        }
    }

    /// The state machine openraft drives.
    pub fn state_machine(&self) -> StateMachine {
        StateMachine {
            store: self.clone(),
        }
    }

    /// Runs a redb write off the async threads (it blocks on fsync).
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StorageError<NodeId>> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write()?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok::<T, redb::Error>(out)
        })
        .await
        .map_err(|e| read_err(format!("a storage thread died: {e}")))?
        .map_err(io_err)
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META).map_err(io_err)?;
        let Some(v) = table.get(key).map_err(io_err)? else {
            return Ok(None);
        };
        open_sealed(key, v.value())
            .map(Some)
            .map_err(|e| read_err(format!("meta {key}: {e}")))
    }

    async fn put_meta<T: Serialize>(
        &self,
        key: &'static str,
        v: &T,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = seal(key, v);
        self.write(move |txn| {
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
        .await
    }
}

enum Verify {
    Damaged(String),
    Io(redb::Error),
}

impl<E: Into<redb::Error>> From<E> for Verify {
    fn from(e: E) -> Self {
        let e: redb::Error = e.into();
        match e {
            redb::Error::Corrupted(what) => Verify::Damaged(what),
            other => Verify::Io(other),
        }
    }
}

/// Reads every value, checking it, and rebuilds the applied registry; also returns the voters
/// of the latest membership entry in the log (applied or not, it is the one in force).
fn verify(db: &redb::Database) -> Result<(Registry, Option<BTreeSet<NodeId>>), Verify> {
    let txn = db.begin_read()?;
    let log = txn.open_table(LOG)?;
    let mut previous: Option<u64> = None;
    let mut voters = None;
    for row in log.iter()? {
        let (k, v) = row?;
        let index = k.value();
        let entry: Entry<TypeConfig> = open_sealed(index.to_be_bytes(), v.value())
            .map_err(|e| Verify::Damaged(format!("log entry {index}: {e}")))?;
        if entry.log_id.index != index {
            return Err(Verify::Damaged(format!(
                "log entry {index} says it is entry {}",
                entry.log_id.index
            )));
        }
        if let Some(p) = previous
            && p + 1 != index
        {
            return Err(Verify::Damaged(format!(
                "the log skips from entry {p} to {index}"
            )));
        }
        previous = Some(index);
        if let EntryPayload::Membership(m) = &entry.payload {
            voters = Some(m.voter_ids().collect());
        }
    }
    let meta = txn.open_table(META)?;
    for row in meta.iter()? {
        let (k, v) = row?;
        let key = k.value().to_owned();
        check_meta(&key, v.value()).map_err(|e| Verify::Damaged(format!("meta {key}: {e}")))?;
    }
    let snap = txn.open_table(SNAPSHOT)?;
    for row in snap.iter()? {
        let (k, v) = row?;
        let key = k.value().to_owned();
        let ok = if key == "meta" {
            open_sealed::<SnapshotMeta<NodeId, openraft::BasicNode>>(&key, v.value()).map(|_| ())
        } else {
            open_sealed::<Vec<u8>>(&key, v.value()).map(|_| ())
        };
        ok.map_err(|e| Verify::Damaged(format!("snapshot {key}: {e}")))?;
    }
    let state = txn.open_table(STATE)?;
    Ok((load_state(&state).map_err(Verify::Damaged)?, voters))
}

fn check_meta(key: &str, v: &[u8]) -> Result<(), String> {
    match key {
        "vote" => open_sealed::<Vote<NodeId>>(key, v).map(|_| ()),
        _ => open_sealed::<Option<LogId<NodeId>>>(key, v).map(|_| ()),
    }
}

/// The registry from the `state` table's rows.
fn load_state(table: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Registry, String> {
    let mut r = Registry::default();
    let mut removed: Vec<(u64, String)> = Vec::new();
    let rows = table.iter().map_err(|e| e.to_string())?;
    for row in rows {
        let (k, v) = row.map_err(|e| e.to_string())?;
        let key = k.value();
        let v = v.value();
        let bad = |e: String| format!("state row {key}: {e}");
        if let Some(id) = key.strip_prefix("a/") {
            r.agents
                .insert(id.to_owned(), open_sealed(key, v).map_err(bad)?);
        } else if let Some(id) = key.strip_prefix("f/") {
            r.frameworks
                .insert(id.to_owned(), open_sealed(key, v).map_err(bad)?);
        } else if let Some(role) = key.strip_prefix("r/") {
            r.roles
                .insert(role.to_owned(), open_sealed(key, v).map_err(bad)?);
        } else if let Some(id) = key.strip_prefix("x/") {
            removed.push((open_sealed(key, v).map_err(bad)?, id.to_owned()));
        } else if key == "epoch" {
            r.epoch = open_sealed(key, v).map_err(bad)?;
        } else if key == "removed_next" {
            r.removed_next = open_sealed(key, v).map_err(bad)?;
        } else if key == "applied" {
            open_sealed::<Option<LogId<NodeId>>>(key, v).map_err(bad)?;
        } else if key == "membership" {
            open_sealed::<StoredMembership<NodeId, openraft::BasicNode>>(key, v).map_err(bad)?;
        } else {
            return Err(format!("unexpected state row {key}"));
        }
    }
    removed.sort();
    r.removed = removed.into_iter().map(|(_, id)| id).collect();
    Ok(r.restored())
}

/// The rows `touched` names, as they are in `r`: `None` deletes the row.
fn rows_for(r: &Registry, touched: &[Touched]) -> Vec<(String, Option<Vec<u8>>)> {
    let mut rows = Vec::with_capacity(touched.len());
    for t in touched {
        match t {
            Touched::Epoch => rows.push(("epoch".to_owned(), Some(seal("epoch", &r.epoch)))),
            Touched::Agent(id) => {
                let k = format!("a/{id}");
                let v = r.agents.get(id).map(|a| seal(&k, a));
                rows.push((k, v));
            }
            Touched::Framework(id) => {
                let k = format!("f/{id}");
                let v = r.frameworks.get(id).map(|f| seal(&k, f));
                rows.push((k, v));
            }
            Touched::Role(role) => {
                let k = format!("r/{role}");
                let v = r.roles.get(role).map(|x| seal(&k, x));
                rows.push((k, v));
            }
            Touched::RemovedAdded(id, seq) => {
                let k = format!("x/{id}");
                let v = seal(&k, seq);
                rows.push((k, Some(v)));
                rows.push((
                    "removed_next".to_owned(),
                    Some(seal("removed_next", &r.removed_next)),
                ));
            }
            Touched::RemovedEvicted(id) => rows.push((format!("x/{id}"), None)),
        }
    }
    rows
}

fn write_rows(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    rows: &[(String, Option<Vec<u8>>)],
) -> Result<(), redb::Error> {
    for (k, v) in rows {
        match v {
            Some(v) => table.insert(k.as_str(), v.as_slice())?,
            None => table.remove(k.as_str())?,
        };
    }
    Ok(())
}

/// Replaces the whole `state` table with `r`.
fn write_all(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    r: &Registry,
) -> Result<(), redb::Error> {
    table.retain(|_, _| false)?;
    let mut touched = vec![Touched::Epoch];
    touched.extend(r.agents.keys().cloned().map(Touched::Agent));
    touched.extend(r.frameworks.keys().cloned().map(Touched::Framework));
    touched.extend(r.roles.keys().cloned().map(Touched::Role));
    write_rows(table, &rows_for(r, &touched))?;
    for (seq, id) in (r.removed_next - r.removed.len() as u64..).zip(&r.removed) {
        let k = format!("x/{id}");
        table.insert(k.as_str(), seal(&k, &seq).as_slice())?;
    }
    table.insert(
        "removed_next",
        seal("removed_next", &r.removed_next).as_slice(),
    )?;
    Ok(())
}

/// openraft's log, over the store.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let db = Arc::clone(&self.store.db);
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(io_err)?;
            let table = txn.open_table(LOG).map_err(io_err)?;
            let mut out = Vec::new();
            for row in table.range::<u64>((start, end)).map_err(io_err)? {
                let (k, v) = row.map_err(io_err)?;
                let entry: Entry<TypeConfig> = open_sealed(k.value().to_be_bytes(), v.value())
                    .map_err(|e| read_err(format!("log entry {}: {e}", k.value())))?;
                out.push(entry);
            }
            Ok(out)
        })
        .await
        .map_err(|e| read_err(format!("a storage thread died: {e}")))?
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let purged: Option<LogId<NodeId>> = self.store.meta("purged")?.flatten();
        let txn = self.store.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(LOG).map_err(io_err)?;
        let last = match table.last().map_err(io_err)? {
            Some((k, v)) => {
                let e: Entry<TypeConfig> = open_sealed(k.value().to_be_bytes(), v.value())
                    .map_err(|e| read_err(format!("log entry {}: {e}", k.value())))?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.store.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.store.meta("vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.store.put_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.store.meta("committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, seal(e.log_id.index.to_be_bytes(), &e)))
            .collect();
        let result = self
            .store
            .write(move |txn| {
                let mut t = txn.open_table(LOG)?;
                for (i, v) in &rows {
                    t.insert(*i, v.as_slice())?;
                }
                Ok(())
            })
            .await;
        // Only now is it on disk: openraft commits on this signal.
        match &result {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        result
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let from = log_id.index;
        self.store
            .write(move |txn| {
                txn.open_table(LOG)?.retain_in(from.., |_, _| false)?;
                Ok(())
            })
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let upto = log_id.index;
        let purged = seal("purged", &Some(log_id));
        self.store
            .write(move |txn| {
                txn.open_table(META)?.insert("purged", purged.as_slice())?;
                txn.open_table(LOG)?.retain_in(..=upto, |_, _| false)?;
                Ok(())
            })
            .await
    }
}

/// openraft's state machine, over the store.
#[derive(Clone)]
pub struct StateMachine {
    store: Store,
}

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

impl StateMachine {
    fn state_value<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        let txn = self.store.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(STATE).map_err(io_err)?;
        let Some(v) = table.get(key).map_err(io_err)? else {
            return Ok(None);
        };
        open_sealed(key, v.value())
            .map(Some)
            .map_err(|e| read_err(format!("state {key}: {e}")))
    }
}

/// A snapshot's data: the registry with the log position it reflects.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotData {
    applied: Option<LogId<NodeId>>,
    membership: Membership,
    registry: Registry,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let applied: Option<LogId<NodeId>> = self.state_value("applied")?.flatten();
        let membership: Membership = self.state_value("membership")?.unwrap_or_default();
        let registry = self.store.registry();
        let data = seal(
            "snapshot",
            &SnapshotData {
                applied,
                membership: membership.clone(),
                registry,
            },
        );
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                applied.map_or(0, |l| l.leader_id.term),
                applied.map_or(0, |l| l.index)
            ),
        };
        let (m, d) = (seal("meta", &meta), seal("data", &data));
        self.store
            .write(move |txn| {
                let mut t = txn.open_table(SNAPSHOT)?;
                t.insert("meta", m.as_slice())?;
                t.insert("data", d.as_slice())?;
                Ok(())
            })
            .await?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "registry snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((
            self.state_value("applied")?.flatten(),
            self.state_value("membership")?.unwrap_or_default(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        // Applied in place: should the write below fail, openraft stops this node for good
        // (a storage error is fatal), so memory running ahead of the disk is never served.
        let mut replies = Vec::with_capacity(entries.len());
        let mut membership: Option<Membership> = None;
        let rows = {
            let mut state = self.store.state.write().expect("registry lock");
            let mut touched = Vec::new();
            for e in &entries {
                match &e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(batch) => {
                        for op in &batch.0 {
                            touched.extend(state.apply(op));
                        }
                    }
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(e.log_id), m.clone()));
                    }
                }
                replies.push(Applied { epoch: state.epoch });
            }
            rows_for(&state, &touched)
        };
        let applied = seal("applied", &Some(last));
        let membership = membership.map(|m| seal("membership", &m));
        self.store
            .write(move |txn| {
                let mut t = txn.open_table(STATE)?;
                write_rows(&mut t, &rows)?;
                t.insert("applied", applied.as_slice())?;
                if let Some(m) = &membership {
                    t.insert("membership", m.as_slice())?;
                }
                Ok(())
            })
            .await?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = open_sealed("snapshot", &bytes).map_err(|e| {
            read_err(format!(
                "snapshot {} from the leader: {e}",
                meta.snapshot_id
            ))
        })?;
        let registry = data.registry.restored();
        let rows = registry.clone();
        let (m, d) = (seal("meta", meta), seal("data", &bytes));
        let applied = seal("applied", &meta.last_log_id);
        let membership = seal("membership", &meta.last_membership);
        self.store
            .write(move |txn| {
                let mut t = txn.open_table(STATE)?;
                write_all(&mut t, &rows)?;
                t.insert("applied", applied.as_slice())?;
                t.insert("membership", membership.as_slice())?;
                let mut s = txn.open_table(SNAPSHOT)?;
                s.insert("meta", m.as_slice())?;
                s.insert("data", d.as_slice())?;
                Ok(())
            })
            .await?;
        *self.store.state.write().expect("registry lock") = registry;
        tracing::info!(snapshot = %meta.snapshot_id, "registry snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let txn = self.store.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(SNAPSHOT).map_err(io_err)?;
        let (Some(m), Some(d)) = (
            table.get("meta").map_err(io_err)?,
            table.get("data").map_err(io_err)?,
        ) else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, openraft::BasicNode> =
            open_sealed("meta", m.value()).map_err(|e| read_err(format!("snapshot meta: {e}")))?;
        let data: Vec<u8> =
            open_sealed("data", d.value()).map_err(|e| read_err(format!("snapshot data: {e}")))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// The default place of the store under a master's work directory.
pub fn path_in(work_dir: &Path) -> PathBuf {
    work_dir.join("registry.redb")
}
