//! The registry over real files and real sockets: restarts, compaction, damage, and a group
//! of three electing a new leader.

use std::time::{Duration, Instant};

use super::*;

fn ops(n: usize) -> Vec<Op> {
    (0..n)
        .map(|i| Op::SetWeight {
            role: format!("r{i}"),
            weight: Some(1.0 + i as f64),
        })
        .collect()
}

async fn wait_leader(r: &Registrar) {
    let mut l = r.leadership();
    tokio::time::timeout(
        Duration::from_secs(20),
        l.wait_for(|l| *l == Leadership::Leader),
    )
    .await
    .expect("becomes leader in time")
    .expect("leadership watch alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_master_keeps_its_registry_across_restarts_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let config = RegistryConfig {
        snapshot_every: 10,
        tls: None,
        ..RegistryConfig::single("127.0.0.1:1".into(), Some(path.clone()))
    };
    let before = {
        let r = Registrar::start(config.clone()).await.unwrap();
        wait_leader(&r).await;
        let epoch = r.write(vec![Op::BeginEpoch]).await.unwrap().epoch;
        assert_eq!(epoch, 1);
        for chunk in ops(60).chunks(2) {
            r.write(chunk.to_vec()).await.unwrap();
        }
        r.write(vec![Op::RemoveFramework { id: "f1".into() }])
            .await
            .unwrap();
        // Compaction keeps the log short: far fewer entries than were written.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (first, last) = r.log_span();
            if first.is_some_and(|f| last.unwrap_or(0) - f < 25) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "log not compacted: {first:?}..{last:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reg = r.registry();
        r.shutdown().await;
        reg
    };
    assert_eq!(before.roles.len(), 60);
    let r = Registrar::start(config).await.unwrap();
    wait_leader(&r).await;
    // What was applied is back as soon as the store opens, and the log replays the rest.
    let after = r.registry();
    assert_eq!(after, before);
    assert!(after.is_removed("f1"));
    assert_eq!(r.write(vec![Op::BeginEpoch]).await.unwrap().epoch, 2);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let config = RegistryConfig::single("127.0.0.1:1".into(), Some(path.clone()));
    {
        let r = Registrar::start(config.clone()).await.unwrap();
        wait_leader(&r).await;
        r.write(ops(5)).await.unwrap();
        r.shutdown().await;
    }
    let good = std::fs::read(&path).unwrap();

    // Emptied.
    std::fs::write(&path, b"").unwrap();
    let e = Registrar::start(config.clone())
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("damaged"), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");

    // Cut short.
    std::fs::write(&path, &good[..good.len() / 3]).unwrap();
    let e = Registrar::start(config.clone())
        .await
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("damaged") || e.to_string().contains("registry store"),
        "{e}"
    );

    // A flipped byte in a stored value is found: damage every copy of one role's row in
    // the file (older pages may hold stale copies; one is live).
    let row = store::seal(
        "r/r3",
        &state::RoleRecord {
            weight: Some(4.0),
            quota: None,
        },
    );
    let mut flipped = good.clone();
    let mut copies = 0;
    let mut i = 0;
    while let Some(at) = flipped[i..]
        .windows(row.len())
        .position(|w| w == row.as_slice())
    {
        // A byte of the weight itself: the value still decodes, only its checksum says
        // it is not what was written.
        flipped[i + at + 8 + 4] ^= 0x01;
        copies += 1;
        i += at + row.len();
    }
    assert!(copies >= 1, "the row is in the file");
    std::fs::write(&path, &flipped).unwrap();
    let e = match Registrar::start(config.clone()).await {
        Ok(r) => panic!(
            "a store with {copies} flipped copies was opened: r3 = {:?}",
            r.registry().roles.get("r3")
        ),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("damaged") && e.contains("r/r3"), "{e}");

    // The good file still opens.
    std::fs::write(&path, &good).unwrap();
    let r = Registrar::start(config).await.unwrap();
    wait_leader(&r).await;
    assert_eq!(r.registry().roles.len(), 5);
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_another_group_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let config = RegistryConfig::single("127.0.0.1:1".into(), Some(path.clone()));
    {
        let r = Registrar::start(config.clone()).await.unwrap();
        wait_leader(&r).await;
        r.shutdown().await;
    }
    let mut other = config;
    other.members.insert(2, "127.0.0.1:2".into());
    let e = Registrar::start(other).await.err().expect("refused");
    assert!(e.to_string().contains("belongs to a group"), "{e}");
}

/// A member serving its peer service on a real socket.
struct Member {
    registrar: Registrar,
    server: tokio::task::JoinHandle<()>,
}

async fn start_group(
    listeners: Vec<tokio::net::TcpListener>,
    dir: &std::path::Path,
) -> Vec<Member> {
    // The members' client addresses lead nowhere: raft must reach each at its raft address.
    let members: BTreeMap<NodeId, String> = (1..=listeners.len() as u64)
        .map(|id| (id, format!("master-{id}.invalid:5050")))
        .collect();
    let raft_addrs: BTreeMap<NodeId, String> = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap().to_string()))
        .collect();
    let mut out = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let config = RegistryConfig {
            id: i as u64 + 1,
            members: members.clone(),
            raft_addrs: raft_addrs.clone(),
            path: Some(dir.join(format!("m{i}.redb"))),
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            snapshot_every: 20,
            tls: None,
        };
        let registrar = Registrar::start(config).await.unwrap();
        let svc = registrar.peer_service();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await;
        });
        out.push(Member { registrar, server });
    }
    out
}

async fn leader_of(group: &[Member], skip: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for (i, m) in group.iter().enumerate() {
            if Some(i) != skip && *m.registrar.leadership().borrow() == Leadership::Leader {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_elects_a_new_leader_that_has_every_committed_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let group = start_group(listeners, dir.path()).await;
    let first = leader_of(&group, None).await;
    let leader = &group[first].registrar;
    leader.write(vec![Op::BeginEpoch]).await.unwrap();
    for chunk in ops(30).chunks(3) {
        leader.write(chunk.to_vec()).await.unwrap();
    }
    // A follower refuses writes and names the leader.
    let follower = (first + 1) % 3;
    match group[follower].registrar.write(ops(1)).await {
        Err(RegistryError::NotLeader { leader: Some(addr) }) => {
            assert_eq!(addr, group[first].registrar.address());
        }
        other => panic!("a follower wrote: {other:?}"),
    }
    // The leader dies.
    let mut group = group;
    let dead = group.swap_remove(first);
    dead.server.abort();
    let dead_addr = dead.registrar.address().to_owned();
    dead.registrar.shutdown().await;
    let t = Instant::now();
    // Within a few heartbeats of its silence, nobody sends callers to the dead leader: they
    // wait for the election instead.
    let names_dead = |m: &Member| {
        *m.registrar.leadership().borrow()
            == Leadership::Follower {
                leader: Some(dead_addr.clone()),
            }
    };
    while group.iter().any(names_dead) {
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "followers still name the dead leader after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let forgotten = t.elapsed();
    let second = leader_of(&group, None).await;
    let elected = t.elapsed();
    eprintln!("the dead leader forgotten after {forgotten:?}");
    let r = &group[second].registrar;
    let applied = r.write(vec![Op::BeginEpoch]).await.unwrap();
    assert_eq!(applied.epoch, 2);
    let reg = r.registry();
    assert_eq!(
        reg.roles.len(),
        30,
        "every committed write survives the failover"
    );
    eprintln!("new leader after {elected:?}");
    for m in group {
        m.server.abort();
        m.registrar.shutdown().await;
    }
}

#[test]
fn members_wait_one_after_the_other_to_stand_for_election() {
    let members: BTreeMap<NodeId, String> =
        (1..=3).map(|i| (i, format!("127.0.0.1:{i}"))).collect();
    let of = |id| {
        staggered(&RegistryConfig {
            id,
            members: members.clone(),
            raft_addrs: BTreeMap::new(),
            path: None,
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
            snapshot_every: 10,
            tls: None,
        })
    };
    assert_eq!([of(1), of(2), of(3)], [(500, 550), (700, 750), (900, 950)]);
    // openraft stands after the lease (the top) and the timeout: the steps never overlap.
    for (a, b) in [(of(1), of(2)), (of(2), of(3))] {
        assert!(a.1 + a.1 < b.1 + b.0, "{a:?} then {b:?}");
    }
}

/// Raft stopped under a master (its peer listener ended, say): the leadership watch says
/// stopped, which stops the master, rather than leave it answering as a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_whose_raft_stops_says_so() {
    let r = Registrar::start(RegistryConfig::single("127.0.0.1:1".into(), None))
        .await
        .unwrap();
    wait_leader(&r).await;
    r.raft.shutdown().await.unwrap();
    let mut l = r.leadership();
    tokio::time::timeout(
        Duration::from_secs(10),
        l.wait_for(|l| matches!(l, Leadership::Stopped(_))),
    )
    .await
    .expect("stopped in time")
    .expect("leadership watch alive");
}
