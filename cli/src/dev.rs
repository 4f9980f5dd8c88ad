//! `agora dev`: masters (one, or a group of 3 or 5) and N agents in one process on loopback,
//! for trying Agora out and for developing frameworks. Each agent gets its share of this
//! machine and its own work directory; each master keeps its registry in its own.

use std::path::PathBuf;
use std::time::Duration;

use agora_core::Resources;
use agora_core::resources::{Range, Ranges, Reservation, Resource, Scalar, Value};
use anyhow::{Context, bail};
use clap::Args;
use tokio::sync::watch;

use crate::shutdown_signal;

#[derive(Args)]
pub struct DevArgs {
    /// How many agents to run.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// How many masters to run: 1, or a replicated group of 3 or 5 (on consecutive ports
    /// from --port).
    #[arg(long, default_value_t = 1)]
    masters: usize,
    /// The (first) master's port on 127.0.0.1 (0 picks free ones).
    #[arg(long, default_value_t = 5050)]
    port: u16,
    /// Where agents keep their sandboxes (default: a new directory under the system's temp
    /// dir, removed on exit).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Serve in the clear: no TLS, no authentication (by default the cluster makes its own
    /// CA and certificates, and leaves the client's where the CLI and SDK find them).
    #[arg(long)]
    no_tls: bool,
}

/// The dev cluster's TLS: the certificates its masters and agents serve with, and the
/// directories it left the client's credentials in (removed when it stops).
struct DevTls {
    master: agora_proto::tls::ServerTls,
    agent: agora_proto::tls::ServerTls,
    left: Vec<PathBuf>,
}

impl DevTls {
    /// A CA and certificates in `work_dir/certs` (made afresh), the client's left for each
    /// of `addrs` under the dev root with this process's pid.
    fn make(work_dir: &std::path::Path, addrs: &[String]) -> anyhow::Result<DevTls> {
        use agora_proto::tls::{Kind, ServerTls};
        let root = agora_proto::tls::dev_root()
            .context("neither AGORA_HOME nor HOME is set: nowhere to leave the dev cluster's credentials (or run with --no-tls)")?;
        let certs = work_dir.join("certs");
        let _ = std::fs::remove_dir_all(&certs);
        crate::cert::init(&certs, 1)?;
        let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let load = |kind: Kind, name: &str| -> anyhow::Result<ServerTls> {
            let (c, k) = crate::cert::issue(&certs, kind, name, &hosts, 30)?;
            Ok(ServerTls::load(&c, &k, &certs.join("ca.pem"))?)
        };
        let master = load(Kind::Master, "dev-master")?;
        let agent = load(Kind::Agent, "dev-agent")?;
        let (client_cert, client_key) =
            crate::cert::issue(&certs, Kind::Client, "dev", &hosts, 30)?;
        let mut left = Vec::new();
        for addr in addrs {
            let dir = agora_proto::tls::dev_dir(&root, addr);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            left.push(dir.clone());
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            std::fs::copy(certs.join("ca.pem"), dir.join("ca.pem"))?;
            std::fs::copy(&client_cert, dir.join("client.pem"))?;
            std::fs::copy(&client_key, dir.join("client.key"))?;
            std::fs::write(dir.join("pid"), std::process::id().to_string())?;
        }
        Ok(DevTls {
            master,
            agent,
            left,
        })
    }
}

impl Drop for DevTls {
    fn drop(&mut self) {
        for d in &self.left {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// This machine's resources split evenly among `n` agents; agent `i` gets its own slice of the
/// port range.
fn share(detected: &Resources, n: usize, i: usize) -> Resources {
    let split = |name: &str| {
        let each = detected.scalar(name).milli() / n as u64;
        Resource {
            name: name.into(),
            reservation: Reservation::Unreserved,
            value: Value::Scalar(Scalar::from_milli(each)),
        }
    };
    let width = 1000 / n as u64;
    let begin = 31000 + width * i as u64;
    [
        split("cpus"),
        split("mem"),
        split("disk"),
        Resource {
            name: "ports".into(),
            reservation: Reservation::Unreserved,
            value: Value::Ranges(Ranges::from_ranges([Range {
                begin,
                end: begin + width - 1,
            }])),
        },
    ]
    .into_iter()
    .collect()
}

pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.agents == 0 || args.agents > 64 {
        bail!("--agents must be between 1 and 64");
    }
    let (work_dir, remove_after) = match args.work_dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("agora-dev-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;

    if ![1, 3, 5].contains(&args.masters) {
        bail!("--masters must be 1, 3 or 5");
    }
    let mut listeners = Vec::new();
    for i in 0..args.masters {
        let port = if args.port == 0 {
            0
        } else {
            args.port + i as u16
        };
        listeners.push(
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .with_context(|| {
                    format!("binding 127.0.0.1:{port} (is another master running? try --port 0)")
                })?,
        );
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let scheme = if args.no_tls { "http" } else { "https" };
    let master = addrs
        .iter()
        .map(|a| format!("{scheme}://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    // The agents' addresses are known now too: their clients find the credentials by them.
    let mut agent_listeners = Vec::new();
    for _ in 0..args.agents {
        agent_listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let tls = if args.no_tls {
        None
    } else {
        let mut all = addrs.clone();
        for l in &agent_listeners {
            all.push(l.local_addr()?.to_string());
        }
        Some(DevTls::make(&work_dir, &all)?)
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // A group's masters replicate on raft listeners of their own, on free ports too.
    let mut raft_listeners = Vec::new();
    let mut peers = std::collections::BTreeMap::new();
    if args.masters > 1 {
        for (i, addr) in (1..).zip(&addrs) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let peer = agora_master::Peer {
                addr: addr.clone(),
                raft_addr: l.local_addr()?.to_string(),
            };
            peers.insert(i, peer);
            raft_listeners.push(l);
        }
    }
    let mut raft_listeners = raft_listeners.into_iter();
    let mut master_tasks = Vec::new();
    for (i, listener) in (1..).zip(listeners) {
        let config = agora_master::MasterConfig {
            agent_heartbeat_interval: Duration::from_secs(1),
            work_dir: Some(if args.masters == 1 {
                work_dir.join("master")
            } else {
                work_dir.join(format!("master-{i}"))
            }),
            group_id: i,
            peers: peers.clone(),
            tls: tls.as_ref().map(|t| t.master.clone()),
            ..Default::default()
        };
        let stop = stopped(stop_rx.clone());
        let raft = raft_listeners.next();
        master_tasks.push(tokio::spawn(async move {
            match raft {
                Some(raft) => agora_master::run_member(listener, raft, config, stop).await,
                None => agora_master::run(listener, config, stop).await,
            }
        }));
    }

    let detected = agora_agent::resources::detect(&work_dir);
    let mut agent_tasks = Vec::new();
    for (i, listener) in agent_listeners.into_iter().enumerate() {
        let dir = work_dir.join(format!("agent-{}", i + 1));
        let mut config = agora_agent::AgentConfig::new(master.clone(), &dir);
        config.tls = tls.as_ref().map(|t| t.agent.clone());
        config.resources = Some(share(&detected, args.agents, i));
        config.hostname = Some(format!("dev-agent-{}", i + 1));
        // A dev cluster kills its tasks when it stops; a new one starts afresh.
        config.recover = agora_agent::Recover::Cleanup;
        // A dev cluster is one user's: file:// URIs may name any of their files.
        config.fetcher.file_roots = vec!["/".into()];
        // Agents on one host need cgroup parents of their own.
        config.native.cgroup_parent = format!("agora-dev-{}/agent-{}", std::process::id(), i + 1);
        let endpoint = listener.local_addr()?;
        println!(
            "agent {}: sandboxes on {scheme}://{endpoint}, work dir {}, {}",
            i + 1,
            dir.display(),
            share(&detected, args.agents, i)
        );
        agent_tasks.push(tokio::spawn(agora_agent::run(
            listener,
            config,
            stopped(stop_rx.clone()),
        )));
    }

    let operator = async {
        for _ in 0..100 {
            // One that ended already says why the cluster cannot get ready.
            if agent_tasks.iter().any(tokio::task::JoinHandle::is_finished)
                || master_tasks
                    .iter()
                    .any(tokio::task::JoinHandle::is_finished)
            {
                return Ok(false);
            }
            // The state, not the health: a follower answers health itself (with no agents),
            // while the state is the leader's, wherever the search lands.
            if let Ok(op) = agora_sdk::Operator::connect(&master).await
                && let Ok(st) = op.state().await
                && st.agents.iter().filter(|a| a.active).count() == args.agents
            {
                return Ok(true);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the agents did not register within 5s")
    };
    let outcome = match operator.await {
        Err(e) => Err(e),
        Ok(false) => Err(first_end(&mut master_tasks, &mut agent_tasks).await),
        Ok(true) => {
            for a in &addrs {
                println!("master: {scheme}://{a} (gRPC; GET {scheme}://{a}/health)");
            }
            if let Some(t) = &tls {
                println!(
                    "TLS on; the CLI and SDK find this cluster's client certificate by themselves (in {})",
                    t.left[0].display()
                );
            }
            println!(
                "ready: {} agent(s) registered. Run a task with:",
                args.agents
            );
            println!("  agora run --master {master} path/to/task.wasm -- ARGS");
            println!("Ctrl-C stops the cluster.");
            // A master or agent that ends by itself (its state owner died) ends the
            // cluster, with its error: a dev cluster that only looks alive is worse than
            // none. Its handle is done with; the others are stopped below.
            tokio::select! {
                () = shutdown_signal() => Ok(()),
                e = first_end(&mut master_tasks, &mut agent_tasks) => Err(e),
            }
        }
    };
    // Whatever ended the cluster, its agents stop and remove their cgroups and tasks.
    println!("stopping");
    let _ = stop_tx.send(true);
    let mut ends: Vec<anyhow::Result<()>> = Vec::new();
    for t in agent_tasks {
        ends.push(t.await.context("agent task").and_then(|r| Ok(r?)));
    }
    for t in master_tasks {
        ends.push(t.await.context("master task").and_then(|r| Ok(r?)));
    }
    if remove_after {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    outcome?;
    ends.into_iter().collect()
}

/// The error of the first master or agent to end by itself; its handle is removed (the
/// others are stopped by the caller).
async fn first_end<E: Into<anyhow::Error>, F: Into<anyhow::Error>>(
    masters: &mut Vec<tokio::task::JoinHandle<Result<(), E>>>,
    agents: &mut Vec<tokio::task::JoinHandle<Result<(), F>>>,
) -> anyhow::Error {
    tokio::select! {
        (i, r) = futures_first(masters) => {
            masters.remove(i);
            ended_by_itself("master", i, r)
        }
        (i, r) = futures_first(agents) => {
            agents.remove(i);
            ended_by_itself("agent", i, r)
        }
    }
}

/// Why the `i`th `what` of the cluster ended before it was told to: its error, or that it
/// ended at all.
fn ended_by_itself<E: Into<anyhow::Error>>(
    what: &str,
    i: usize,
    r: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("{what} {} stopped by itself", i + 1),
        Ok(Err(e)) => e.into(),
        Err(e) => anyhow::Error::new(e).context(format!("{what} task")),
    }
}

/// The first of `tasks` to end, with its index; pending for ever when there are none.
async fn futures_first<T>(
    tasks: &mut [tokio::task::JoinHandle<T>],
) -> (usize, Result<T, tokio::task::JoinError>) {
    use std::future::Future as _;
    if tasks.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for (i, t) in tasks.iter_mut().enumerate() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(t).poll(cx) {
                return std::task::Poll::Ready((i, r));
            }
        }
        std::task::Poll::Pending
    })
    .await
}
