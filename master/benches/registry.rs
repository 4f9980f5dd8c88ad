//! The durable write cost of the registry, beside a bare redb commit loop in the same run.
//!
//! `cargo bench -p agora-master --bench registry` prints, for N writes each made durable:
//! a bare redb commit (one row, one fsync) per write; a lone master's registry, one write
//! at a time and 16 writers at once; and a group of three on loopback, one at a time. Each
//! figure is also given as a ratio to the bare commit's time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agora_master::registry::{Leadership, Op, Registrar, RegistryConfig};

const N: usize = 500;

fn op(i: usize) -> Op {
    Op::SetWeight {
        role: format!("role{}", i % 64),
        weight: Some(1.0 + (i % 7) as f64),
    }
}

fn bare(dir: &std::path::Path) -> Duration {
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let db = redb::Database::create(dir.join("bare.redb")).unwrap();
    let value = vec![7u8; 64];
    let t = Instant::now();
    for i in 0..N as u64 {
        let txn = db.begin_write().unwrap();
        txn.open_table(T)
            .unwrap()
            .insert(i, value.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    t.elapsed()
}

async fn leader(r: &Registrar) {
    let mut l = r.leadership();
    tokio::time::timeout(
        Duration::from_secs(30),
        l.wait_for(|l| *l == Leadership::Leader),
    )
    .await
    .expect("a leader in time")
    .unwrap();
}

async fn lone(dir: &std::path::Path, writers: usize) -> Duration {
    let r = Registrar::start(RegistryConfig::single(
        "127.0.0.1:1".into(),
        Some(dir.join(format!("lone-{writers}.redb"))),
    ))
    .await
    .unwrap();
    leader(&r).await;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..N).step_by(writers) {
                r.write(vec![op(i)]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = t.elapsed();
    r.shutdown().await;
    took
}

async fn group(dir: &std::path::Path) -> Duration {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let members: BTreeMap<u64, String> = (1..)
        .zip(
            listeners
                .iter()
                .map(|l| l.local_addr().unwrap().to_string()),
        )
        .collect();
    let mut regs = Vec::new();
    let mut servers = Vec::new();
    for (id, l) in (1..).zip(listeners) {
        let r = Registrar::start(RegistryConfig {
            id,
            members: members.clone(),
            path: Some(dir.join(format!("g{id}.redb"))),
            ..RegistryConfig::single(String::new(), None)
        })
        .await
        .unwrap();
        let svc = r.peer_service();
        servers.push(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await;
        }));
        regs.push(r);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let lead = loop {
        if let Some(r) = regs
            .iter()
            .find(|r| *r.leadership().borrow() == Leadership::Leader)
        {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let t = Instant::now();
    for i in 0..N {
        lead.write(vec![op(i)]).await.unwrap();
    }
    let took = t.elapsed();
    drop(lead);
    for s in servers {
        s.abort();
    }
    for r in regs {
        r.shutdown().await;
    }
    took
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = bare(dir.path());
    let per = |d: Duration| d.as_secs_f64() * 1e6 / N as f64;
    println!("{N} durable writes each; times per write, and as a ratio to a bare redb commit");
    println!(
        "bare redb commit (1 row, fsync)      {:8.1} µs   1.00×",
        per(base)
    );
    let rows = [
        (
            "registry, lone master, 1 writer",
            rt.block_on(lone(dir.path(), 1)),
        ),
        (
            "registry, lone master, 16 writers",
            rt.block_on(lone(dir.path(), 16)),
        ),
        (
            "registry, 3 masters on loopback",
            rt.block_on(group(dir.path())),
        ),
    ];
    for (name, d) in rows {
        println!(
            "{name:<36} {:8.1} µs   {:.2}×   ({:.0} writes/s)",
            per(d),
            d.as_secs_f64() / base.as_secs_f64(),
            N as f64 / d.as_secs_f64()
        );
    }
}
