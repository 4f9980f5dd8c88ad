//! Multi-component tests: a master, agents and frameworks over real loopback gRPC, in this
//! process (`cluster`, `faults`) and as separate `agora` processes (`processes`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_recovery;
mod auth;
mod bounds;
mod cluster;
mod dev;
mod disk;
mod executors;
mod failover;
mod faults;
mod fetch;
mod hardening_agent;
mod limits;
mod mesos;
mod mesos_clients;
mod mesos_executor;
mod native;
mod partition;
mod ports;
mod processes;
mod registry;
mod roles;
mod seen;
mod takeover;
mod tls;
mod wasm;

use std::time::Duration;

use agora_agent::AgentConfig;
use agora_core::{TaskId, TaskState, parse_resources};
use agora_examples::{Target, task_bytes};
use agora_master::MasterConfig;
use agora_proto::{state_from_proto, v1};
use agora_sdk::{Event, Events, Scheduler, SchedulerConfig, TaskBuilder, subscribe};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// Master settings that make time-driven behaviour quick to observe.
pub fn fast_master() -> MasterConfig {
    MasterConfig {
        agent_heartbeat_interval: Duration::from_millis(100),
        // A second of silence: two clusters compiling Wasm side by side on two cores can
        // hold an agent's heartbeat up for a few hundred milliseconds, and its tasks must
        // not be written off for that.
        max_missed_heartbeats: 10,
        allocation_interval: Duration::from_millis(100),
        framework_heartbeat_interval: Duration::from_secs(1),
        // These clusters test other things than durability (the registry's own tests run
        // masters on disk): a disk busy with a parallel build must not hold up their
        // registrations behind fsyncs.
        registry_in_memory: true,
        // A test that skips over offers while it waits for something else (an update may
        // free resources, and have them offered, before it reaches the framework) gets them
        // again.
        offer_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    }
}

pub struct Stoppable<T> {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<T>>,
}

impl<T> Stoppable<T> {
    fn spawn<F>(run: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> F) -> Self
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = rx.await;
        })));
        Stoppable {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(&mut self) -> T {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task
            .take()
            .expect("stopped once")
            .await
            .expect("task panicked")
    }
}

pub struct Agent {
    pub handle: Stoppable<Result<(), agora_agent::AgentError>>,
    pub endpoint: String,
}

/// A master and agents in this process, each on its own loopback port.
pub struct Cluster {
    pub master: String,
    pub master_addr: std::net::SocketAddr,
    pub master_handle: Stoppable<Result<(), agora_master::MasterError>>,
    pub agents: Vec<Agent>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(agents: &[&str]) -> Cluster {
        Cluster::start_with(fast_master(), agents).await
    }

    pub async fn start_with(mut config: MasterConfig, agents: &[&str]) -> Cluster {
        init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let master_addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        if config.work_dir.is_none() {
            config.work_dir = Some(dir.path().join("master"));
        }
        let master_handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
        let mut cluster = Cluster {
            master: format!("http://{master_addr}"),
            master_addr,
            master_handle,
            agents: Vec::new(),
            dir,
        };
        for resources in agents {
            cluster.add_agent(resources).await;
        }
        cluster.wait_for_agents(agents.len()).await;
        cluster
    }

    pub fn agent_config(&self, resources: &str) -> AgentConfig {
        let n = self.agents.len() + 1;
        agent_config_for(
            &self.master,
            &self.dir.path().join(format!("agent-{n}")),
            n,
            resources,
        )
    }

    pub async fn add_agent(&mut self, resources: &str) -> usize {
        let config = self.agent_config(resources);
        self.add_agent_with(config).await
    }

    pub async fn add_agent_with(&mut self, config: AgentConfig) -> usize {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let handle = Stoppable::spawn(move |stop| agora_agent::run(listener, config, stop));
        self.agents.push(Agent { handle, endpoint });
        self.agents.len() - 1
    }

    pub async fn state(&self) -> v1::GetStateResponse {
        agora_sdk::Operator::connect(&self.master)
            .await
            .unwrap()
            .state()
            .await
            .unwrap()
    }

    /// Waits until the operator API shows `n` active agents.
    pub async fn wait_for_agents(&self, n: usize) {
        wait_until("agents to register", || async {
            self.state()
                .await
                .agents
                .iter()
                .filter(|a| a.active)
                .count()
                == n
        })
        .await;
    }

    pub async fn framework(&self, name: &str) -> (Scheduler, Events) {
        let mut config = SchedulerConfig::new(self.master.clone(), name);
        config.framework.failover_timeout = 5.0;
        self.framework_with(config).await
    }

    pub async fn framework_with(&self, config: SchedulerConfig) -> (Scheduler, Events) {
        subscribed(config).await
    }
}

/// A framework subscribed with `config`, its SUBSCRIBED event taken.
pub async fn subscribed(config: SchedulerConfig) -> (Scheduler, Events) {
    let (s, mut events) = subscribe(config).await.unwrap();
    assert!(matches!(
        events.next().await,
        Some(Event::Subscribed { .. })
    ));
    (s, events)
}

/// A child process (an `agora master`, say) killed with SIGKILL by [`Killed::kill`] or when
/// dropped: what a crash looks like to everyone else.
pub struct Killed(pub Option<std::process::Child>);

impl Killed {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Killed {
    /// An `agora master` process on `listen` keeping its registry in `work_dir`, with the
    /// tests' quick timing and `extra` flags; its logs (warnings) go to the test's stderr.
    pub fn master(listen: &str, work_dir: &std::path::Path, extra: &[&str]) -> Killed {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
            .args(["master", "--listen", listen, "--work-dir"])
            .arg(work_dir)
            .args([
                "--agent-heartbeat-interval",
                "200ms",
                "--allocation-interval",
                "100ms",
                "--framework-heartbeat-interval",
                "1s",
            ])
            .args(extra)
            .env("AGORA_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        Killed(Some(child))
    }
}

/// The lines a child writes to `out` (its stdout or stderr), as they come, read on a thread
/// of their own so that a test can wait for one with a deadline.
pub fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end even once nobody listens, so the child never blocks on a full pipe.
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Resources from their text form, which the test knows to be valid.
pub fn res(s: &str) -> agora_core::Resources {
    agora_core::parse_resources(s).unwrap()
}

/// An operator client of the master at `master`, once that master says it leads.
pub async fn leading_operator(master: &str) -> agora_sdk::Operator {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(op) = agora_sdk::Operator::connect(master).await
            && op
                .health()
                .await
                .is_ok_and(|h| h.healthy && h.role == "leader")
        {
            return op;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "master at {master} never led"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settings of test agent `n` for the master(s) at `master`, working in `dir`.
pub fn agent_config_for(
    master: &str,
    dir: &std::path::Path,
    n: usize,
    resources: &str,
) -> AgentConfig {
    let mut config = AgentConfig::new(master.to_owned(), dir);
    config.resources = Some(parse_resources(resources).unwrap());
    config.hostname = Some(format!("agent-{n}"));
    config.status_retry = Duration::from_millis(500);
    // Each agent removes what it finds under its cgroup parent when it starts: tests
    // running side by side must not share one.
    static AGENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    config.native.cgroup_parent = format!(
        "agora-test-{}-agent-{}",
        std::process::id(),
        AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    // Wasm tasks run in the framework's Wasm executor, as with the real binary.
    config.wasm_executor = Some(vec![
        env!("CARGO_BIN_EXE_agora").into(),
        "__wasm-executor".into(),
    ]);
    config.native.init = Some(vec![
        env!("CARGO_BIN_EXE_agora").into(),
        "__init".into(),
        "--".into(),
    ]);
    config
}

/// Polls `check` until it holds, failing after [`WAIT`].
/// Logs of the master and agents in a test's output when `AGORA_TEST_LOG` is set (an
/// `EnvFilter`, e.g. `warn` or `agora_master=debug`); shown for failing tests.
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("AGORA_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

pub async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event that `pick` accepts, skipping others; fails after [`WAIT`].
pub async fn next_matching<T>(
    events: &mut Events,
    what: &str,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = tokio::time::timeout(left, events.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("events ended while waiting for {what}"));
        if let Some(t) = pick(ev) {
            return t;
        }
    }
}

pub async fn next_offers(events: &mut Events) -> Vec<v1::Offer> {
    next_matching(events, "offers", |e| match e {
        Event::Offers(o) => Some(o),
        _ => None,
    })
    .await
}

/// The next update of `task` in `state`.
pub async fn wait_state(events: &mut Events, task: &TaskId, state: TaskState) -> v1::TaskStatus {
    next_matching(events, &format!("{task} to reach {state}"), |e| match e {
        Event::Update(s)
            if s.task_id.as_ref().is_some_and(|t| t.value == task.as_str())
                && state_from_proto(s.state()) == Some(state) =>
        {
            Some(s)
        }
        _ => None,
    })
    .await
}

/// The next terminal update of `task`.
pub async fn wait_terminal(events: &mut Events, task: &TaskId) -> v1::TaskStatus {
    next_matching(events, &format!("{task} to end"), |e| match e {
        Event::Update(s)
            if s.task_id.as_ref().is_some_and(|t| t.value == task.as_str())
                && state_from_proto(s.state()).is_some_and(TaskState::is_terminal) =>
        {
            Some(s)
        }
        _ => None,
    })
    .await
}

pub fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

pub fn wasm_task(id: &str, example: &str, resources: &str) -> TaskBuilder {
    TaskBuilder::wasm(tid(id), task_bytes(example, Target::P1))
        .resources(parse_resources(resources).unwrap())
}

/// Waits for an offer and launches `task` on it (on the next one, if a master with an offer
/// timeout took that one back meanwhile).
pub async fn launch(scheduler: &Scheduler, events: &mut Events, task: TaskBuilder) -> v1::Offer {
    loop {
        let offer = next_offers(events).await.remove(0);
        match scheduler
            .accept(
                &[offer.id.clone().unwrap()],
                vec![task.clone().build_for(&offer)],
                Some(0.0),
            )
            .await
        {
            Ok(()) => return offer,
            Err(e) if e.to_string().contains("no longer valid") => continue,
            Err(e) => panic!("accepting an offer: {e}"),
        }
    }
}

/// Asserts how a task ended: its state, its reason, and a phrase of its message.
pub fn assert_ended(end: &v1::TaskStatus, state: TaskState, reason: v1::Reason, says: &str) {
    assert_eq!(
        (state_of(end), end.reason()),
        (state, reason),
        "{}",
        end.message
    );
    assert!(
        end.message.contains(says),
        "{says:?} not in {:?}",
        end.message
    );
}

pub fn state_of(s: &v1::TaskStatus) -> TaskState {
    state_from_proto(s.state()).unwrap()
}
