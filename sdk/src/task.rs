//! Building tasks and fitting them into offers.

use agora_core::resources::Ranges;
use agora_core::{AgentId, Resources, TaskId};
use agora_proto::{resources_from_proto, resources_to_proto, v1};

use crate::Error;

/// The resources of an offer, validated.
///
/// # Errors
/// [`Error::Protocol`] when the master sent resources that do not parse.
pub fn offer_resources(offer: &v1::Offer) -> Result<Resources, Error> {
    resources_from_proto(&offer.resources).map_err(|e| Error::Protocol(e.to_string()))
}

/// Hands out an offer's resources task by task.
///
/// ```
/// use agora_sdk::{OfferPool, core::parse_resources};
/// let mut pool = OfferPool::from_resources(parse_resources("cpus:2;mem:1024").unwrap());
/// let need = parse_resources("cpus:0.5;mem:256").unwrap();
/// let mut fitted = 0;
/// while pool.take(&need).is_some() {
///     fitted += 1;
/// }
/// assert_eq!(fitted, 4);
/// ```
#[derive(Debug, Clone)]
pub struct OfferPool {
    left: Resources,
}

impl OfferPool {
    /// # Errors
    /// When the offer's resources do not parse.
    pub fn new(offer: &v1::Offer) -> Result<Self, Error> {
        Ok(OfferPool {
            left: offer_resources(offer)?,
        })
    }

    pub fn from_resources(left: Resources) -> Self {
        OfferPool { left }
    }

    /// True when `need` still fits.
    pub fn fits(&self, need: &Resources) -> bool {
        self.left.contains(need)
    }

    /// Takes `need` if it fits.
    pub fn take(&mut self, need: &Resources) -> Option<Resources> {
        let rest = self.left.checked_sub(need)?;
        self.left = rest;
        Some(need.clone())
    }

    /// Takes `count` ports (the lowest free ones) if there are that many.
    pub fn take_ports(&mut self, count: u64) -> Option<Ranges> {
        let ports = self.left.unreserved().ranges("ports").take(count)?;
        let taken: Resources = std::iter::once(agora_core::Resource {
            name: "ports".into(),
            reservation: agora_core::Reservation::Unreserved,
            value: agora_core::Value::Ranges(ports.clone()),
        })
        .collect();
        self.left.subtract(&taken);
        Some(ports)
    }

    /// What is left.
    pub fn remaining(&self) -> &Resources {
        &self.left
    }
}

/// Builds a [`v1::TaskInfo`].
///
/// ```
/// use agora_sdk::{TaskBuilder, core::{parse_resources, TaskId}};
/// let task = TaskBuilder::wasm(TaskId::new("hello-1").unwrap(), b"\0asm\x01\0\0\0".to_vec())
///     .resources(parse_resources("cpus:0.1;mem:32").unwrap())
///     .args(["Agora"])
///     .env("GREETING", "Hi")
///     .max_duration(10.0)
///     .build();
/// assert_eq!(task.name, "hello-1");
/// ```
#[derive(Debug, Clone)]
pub struct TaskBuilder {
    task: v1::TaskInfo,
}

impl TaskBuilder {
    fn wasm_task(task_id: &TaskId) -> v1::TaskInfo {
        v1::TaskInfo {
            name: task_id.to_string(),
            task_id: Some(task_id.into()),
            payload: Some(v1::task_info::Payload::Wasm(v1::WasmTask::default())),
            ..Default::default()
        }
    }

    fn wasm_mut(&mut self) -> Option<&mut v1::WasmTask> {
        match &mut self.task.payload {
            Some(v1::task_info::Payload::Wasm(w)) => Some(w),
            _ => None,
        }
    }

    /// Continues building from a task info made elsewhere.
    pub fn from_info(task: v1::TaskInfo) -> Self {
        TaskBuilder { task }
    }

    /// A Wasm task whose module travels inline (its sha256 is sent too, for checking).
    pub fn wasm(task_id: TaskId, module: Vec<u8>) -> Self {
        use sha2::Digest;
        let mut b = TaskBuilder {
            task: Self::wasm_task(&task_id),
        };
        if let Some(w) = b.wasm_mut() {
            w.sha256 = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&module)));
            w.module = Some(v1::wasm_task::Module::ModuleBytes(module));
        }
        b
    }

    /// A Wasm task naming a module the agent already has (`sha256:<hex>`).
    pub fn wasm_digest(task_id: TaskId, digest: impl Into<String>) -> Self {
        let mut b = TaskBuilder {
            task: Self::wasm_task(&task_id),
        };
        if let Some(w) = b.wasm_mut() {
            w.module = Some(v1::wasm_task::Module::Digest(digest.into()));
        }
        b
    }

    /// A native command, run with `/bin/sh -c`.
    pub fn command(task_id: TaskId, shell_command: impl Into<String>) -> Self {
        TaskBuilder {
            task: v1::TaskInfo {
                name: task_id.to_string(),
                task_id: Some((&task_id).into()),
                payload: Some(v1::task_info::Payload::Command(v1::CommandTask {
                    value: shell_command.into(),
                    shell: true,
                    ..Default::default()
                })),
                ..Default::default()
            },
        }
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.task.name = name.into();
        self
    }

    pub fn resources(mut self, resources: Resources) -> Self {
        self.task.resources = resources_to_proto(&resources);
        self
    }

    /// Arguments after argv[0] (which is the task's name).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        match &mut self.task.payload {
            Some(v1::task_info::Payload::Wasm(w)) => w.args.extend(args),
            Some(v1::task_info::Payload::Command(c)) => c.arguments.extend(args),
            None => {}
        }
        self
    }

    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let var = v1::EnvVar {
            name: name.into(),
            value: value.into(),
        };
        match &mut self.task.payload {
            Some(v1::task_info::Payload::Wasm(w)) => w.env.push(var),
            Some(v1::task_info::Payload::Command(c)) => c.env.push(var),
            None => {}
        }
        self
    }

    fn caps_mut(&mut self) -> Option<&mut v1::WasmCapabilities> {
        self.wasm_mut()
            .map(|w| w.capabilities.get_or_insert_with(Default::default))
    }

    /// A Wasm task whose module the agent fetches: `https://…`, `file:///…` or a blob
    /// (`sha256:<hex>`) in the master's store; `sha256` (optional) is checked.
    pub fn wasm_uri(task_id: TaskId, uri: impl Into<String>, sha256: Option<String>) -> Self {
        let mut b = TaskBuilder {
            task: Self::wasm_task(&task_id),
        };
        if let Some(w) = b.wasm_mut() {
            let uri: String = uri.into();
            w.module = Some(if uri.starts_with("sha256:") {
                v1::wasm_task::Module::Digest(uri)
            } else {
                v1::wasm_task::Module::Uri(uri)
            });
            w.sha256 = sha256.unwrap_or_default();
        }
        b
    }

    /// The bytes an `agora:task` component's `run` receives.
    pub fn input(mut self, input: impl Into<Vec<u8>>) -> Self {
        if let Some(w) = self.wasm_mut() {
            w.input = input.into();
        }
        self
    }

    /// Grants a Wasm task its sandbox directory, read-write, as `/`.
    pub fn grant_sandbox(mut self) -> Self {
        if let Some(c) = self.caps_mut() {
            c.sandbox = true;
        }
        self
    }

    /// Grants a Wasm task one of the agent's volumes at `guest_path`.
    pub fn grant_volume(
        mut self,
        name: impl Into<String>,
        guest_path: impl Into<String>,
        read_only: bool,
    ) -> Self {
        if let Some(c) = self.caps_mut() {
            c.volumes.push(v1::VolumeGrant {
                name: name.into(),
                guest_path: guest_path.into(),
                read_only,
            });
        }
        self
    }

    /// Grants a Wasm task the agent's value of an environment variable.
    pub fn grant_host_env(mut self, name: impl Into<String>) -> Self {
        if let Some(c) = self.caps_mut() {
            c.host_env.push(name.into());
        }
        self
    }

    /// Grants a Wasm task outbound connections to `HOST:PORT` (IP, CIDR, `localhost` or
    /// `*`; port, range or `*`).
    pub fn grant_connect(mut self, pattern: impl Into<String>) -> Self {
        if let Some(c) = self.caps_mut() {
            c.connect.push(pattern.into());
        }
        self
    }

    /// Grants a Wasm task the real wall clock.
    pub fn grant_wall_clock(mut self) -> Self {
        if let Some(c) = self.caps_mut() {
            c.wall_clock = true;
        }
        self
    }

    /// Grants a Wasm task the operating system's randomness.
    pub fn grant_random(mut self) -> Self {
        if let Some(c) = self.caps_mut() {
            c.random = true;
        }
        self
    }

    /// A deterministic instruction budget for a Wasm task.
    pub fn fuel(mut self, fuel: u64) -> Self {
        if let Some(w) = self.wasm_mut() {
            w.fuel = Some(fuel);
        }
        self
    }

    /// Wall-clock limit in seconds; a Wasm task also gets cpus × this of CPU time.
    pub fn max_duration(mut self, seconds: f64) -> Self {
        self.task.max_duration = seconds;
        self
    }

    /// How long a native task has between SIGTERM and SIGKILL when it is killed.
    pub fn kill_grace(mut self, grace: std::time::Duration) -> Self {
        self.task.kill_policy = Some(v1::KillPolicy {
            grace_period_seconds: grace.as_secs_f64(),
        });
        self
    }

    /// Fetch `uri` into the sandbox before the task starts (see [`uri`] to build one).
    pub fn uri(mut self, uri: v1::Uri) -> Self {
        self.task.uris.push(uri);
        self
    }

    /// Run the task in a custom executor (see [`executor`]); the agent starts it, or
    /// reuses the framework's running executor of that id.
    pub fn executor(mut self, executor: v1::ExecutorInfo) -> Self {
        self.task.executor = Some(executor);
        self
    }

    /// Opaque bytes for the task's executor.
    pub fn data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.task.data = data.into();
        self
    }

    /// Refuse to run unless the agent gives this isolation (e.g. `cgroups`, `memory`,
    /// `pid-ns`, `net-ns`); see the agent's `ISOLATION_WORDS`.
    pub fn require_isolation(mut self, word: impl Into<String>) -> Self {
        self.task.required_isolation.push(word.into());
        self
    }

    /// Run a native task as this user (it must exist on the agent).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        if let Some(v1::task_info::Payload::Command(c)) = &mut self.task.payload {
            c.user = user.into();
        }
        self
    }

    /// The most processes a native task may have at once (its cgroup's `pids.max`), in
    /// place of the agent's default.
    pub fn pids_max(mut self, n: u64) -> Self {
        if let Some(v1::task_info::Payload::Command(c)) = &mut self.task.payload {
            c.pids_max = Some(n);
        }
        self
    }

    /// Give a native task a network namespace with loopback only.
    pub fn network_none(mut self) -> Self {
        if let Some(v1::task_info::Payload::Command(c)) = &mut self.task.payload {
            c.set_network(v1::command_task::Network::None);
        }
        self
    }

    /// Pins the task to an agent (set by [`TaskBuilder::build_for`]).
    pub fn agent(mut self, agent: &AgentId) -> Self {
        self.task.agent_id = Some(agent.into());
        self
    }

    pub fn build(self) -> v1::TaskInfo {
        self.task
    }

    /// Builds the task for the offer's agent.
    pub fn build_for(self, offer: &v1::Offer) -> v1::TaskInfo {
        let mut t = self.task;
        t.agent_id = offer.agent_id.clone();
        t
    }
}

/// A URI to fetch: `http(s)://…`, `file:///…` or `sha256:<hex>`. Set its flags
/// (`executable`, `extract`, `cache`, `sha256`, `output_file`) on the returned value.
///
/// ```
/// let mut u = agora_sdk::task::uri("https://example.org/tool.tar.gz");
/// u.extract = true;
/// u.cache = true;
/// ```
pub fn uri(value: impl Into<String>) -> v1::Uri {
    v1::Uri {
        value: value.into(),
        ..Default::default()
    }
}

/// A custom executor running `shell_command`, with id `id`.
pub fn executor(id: &agora_core::ExecutorId, shell_command: impl Into<String>) -> v1::ExecutorInfo {
    v1::ExecutorInfo {
        executor_id: Some(id.into()),
        name: id.to_string(),
        command: Some(v1::CommandTask {
            value: shell_command.into(),
            shell: true,
            ..Default::default()
        }),
        uris: Vec::new(),
        mesos_executor: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_core::parse_resources;

    #[test]
    fn pool_hands_out_ports() {
        let mut pool = OfferPool::from_resources(
            parse_resources("cpus:1;ports:[31000-31002, 31010-31020]").unwrap(),
        );
        assert_eq!(
            pool.take_ports(4).unwrap().to_string(),
            "[31000-31002, 31010-31010]"
        );
        assert_eq!(pool.remaining().to_string(), "cpus:1;ports:[31011-31020]");
        assert!(pool.take_ports(11).is_none());
    }

    #[test]
    fn builder_fills_the_wasm_payload() {
        let t = TaskBuilder::wasm(TaskId::new("t").unwrap(), vec![1, 2, 3])
            .args(["a", "b"])
            .env("K", "V")
            .fuel(9)
            .build();
        let Some(v1::task_info::Payload::Wasm(w)) = t.payload else {
            panic!("not wasm")
        };
        assert_eq!(w.args, ["a", "b"]);
        assert_eq!(w.env[0].name, "K");
        assert_eq!(w.fuel, Some(9));
        assert!(w.sha256.starts_with("sha256:"));
    }
}
