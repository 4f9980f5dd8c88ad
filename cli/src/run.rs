//! `agora run`: a one-shot framework, like `mesos-execute`. It waits for an offer that fits,
//! launches the task, prints its state changes (to stderr), then its stdout and stderr (and
//! an agora:task component's output), and exits with the task's exit code.
//!
//! The task is a Wasm file, a shell command (`--cmd`), or a bundle (a directory with an
//! `agora.toml`, or an archive of one from `agora bundle build`): a bundle is checked, its
//! module and files uploaded to the master's blob store, and run as its manifest says.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agora_core::{Resource, Resources, TaskId, TaskState};
use agora_proto::{reason_name, state_from_proto, v1};
use agora_sdk::{
    Event, OfferPool, Operator, SchedulerConfig, TaskBuilder, read_sandbox_file, subscribe,
};
use anyhow::{Context, anyhow, bail};
use clap::Args;

use crate::{master_url, parse_duration, shutdown_signal};

#[derive(Args)]
pub struct RunArgs {
    /// The Wasm module or component to run, or a bundle (a directory with an agora.toml,
    /// or a .tgz made by `agora bundle build`).
    #[arg(required_unless_present = "cmd", conflicts_with = "cmd")]
    file: Option<PathBuf>,
    /// Run a shell command as a native task instead (in a cgroup on the agent), e.g.
    /// `--cmd 'python3 -c "print(1)"'`.
    #[arg(long)]
    cmd: Option<String>,
    /// Arguments passed to the task.
    #[arg(last = true)]
    args: Vec<String>,
    /// The master's address, or the masters of a group: 'HOST:PORT,HOST:PORT,HOST:PORT'
    /// (the task is launched through the leader among them).
    #[arg(long, env = "AGORA_MASTER", default_value = "127.0.0.1:5050")]
    master: String,
    /// CPUs for the task.
    #[arg(long, default_value_t = 0.1)]
    cpus: f64,
    /// Memory for the task in MiB: the ceiling on its linear memory, or its cgroup's limit.
    #[arg(long, default_value_t = 64.0)]
    mem: f64,
    /// Deterministic instruction budget (wasmtime fuel).
    #[arg(long)]
    fuel: Option<u64>,
    /// Time limit in seconds (e.g. 10, 500ms); the task also gets cpus × this of CPU time.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Environment variables for the task, NAME=VALUE.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// The task's name (default: the file's stem).
    #[arg(long)]
    name: Option<String>,
    /// How long to wait for an offer that fits.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    offer_wait: Duration,
    /// Fetch into the sandbox first: 'URL[,extract][,cache][,executable][,sha256=HEX][,as=NAME]'
    /// (http://, https://, file:///… or sha256:HEX). Repeatable.
    #[arg(long = "uri", value_parser = parse_uri)]
    uris: Vec<v1::Uri>,
    /// Refuse to run unless the agent gives this isolation (cgroups, memory, pid-ns, …).
    /// Repeatable.
    #[arg(long = "require-isolation")]
    require_isolation: Vec<String>,
    /// Run a --cmd task as this user on the agent.
    #[arg(long, requires = "cmd")]
    user: Option<String>,
    /// Give a Wasm task a capability (all are denied otherwise): sandbox, wall-clock,
    /// random, env:NAME (the agent's variable), connect:HOST:PORT, volume:NAME:/PATH[:ro].
    /// Repeatable.
    #[arg(long = "grant", value_parser = parse_grant)]
    grants: Vec<Grant>,
    /// An agora:task component's input: the bytes of this file.
    #[arg(long)]
    input: Option<PathBuf>,
}

/// A capability given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    Sandbox,
    WallClock,
    Random,
    Env(String),
    Connect(String),
    Volume {
        name: String,
        path: String,
        read_only: bool,
    },
}

fn parse_grant(s: &str) -> Result<Grant, String> {
    Ok(match s.split_once(':') {
        None if s == "sandbox" => Grant::Sandbox,
        None if s == "wall-clock" => Grant::WallClock,
        None if s == "random" => Grant::Random,
        Some(("env", name)) if !name.is_empty() => Grant::Env(name.to_owned()),
        Some(("connect", pattern)) if !pattern.is_empty() => Grant::Connect(pattern.to_owned()),
        Some(("volume", rest)) => {
            let (name, path) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: a volume grant is volume:NAME:/PATH[:ro]"))?;
            let (path, read_only) = match path.strip_suffix(":ro") {
                Some(p) => (p, true),
                None => (path, false),
            };
            Grant::Volume {
                name: name.to_owned(),
                path: path.to_owned(),
                read_only,
            }
        }
        _ => {
            return Err(format!(
                "{s:?}: grant sandbox, wall-clock, random, env:NAME, connect:HOST:PORT or volume:NAME:/PATH[:ro]"
            ));
        }
    })
}

fn apply(b: TaskBuilder, g: &Grant) -> TaskBuilder {
    match g {
        Grant::Sandbox => b.grant_sandbox(),
        Grant::WallClock => b.grant_wall_clock(),
        Grant::Random => b.grant_random(),
        Grant::Env(n) => b.grant_host_env(n),
        Grant::Connect(p) => b.grant_connect(p),
        Grant::Volume {
            name,
            path,
            read_only,
        } => b.grant_volume(name, path, *read_only),
    }
}

/// Whether `path` is a bundle rather than a Wasm file.
fn is_bundle(path: &std::path::Path) -> bool {
    path.is_dir()
        || path.file_name().is_some_and(|n| {
            n.to_string_lossy().ends_with(".tgz") || n.to_string_lossy().ends_with(".tar.gz")
        })
}

/// `URL[,extract][,cache][,executable][,sha256=HEX][,as=NAME]`: options are peeled off the
/// end, so a URL may itself hold commas.
pub fn parse_uri(s: &str) -> Result<v1::Uri, String> {
    let mut uri = v1::Uri::default();
    let mut rest = s.trim();
    while let Some((head, opt)) = rest.rsplit_once(',') {
        match opt.trim() {
            "extract" => uri.extract = true,
            "cache" => uri.cache = true,
            "executable" => uri.executable = true,
            o if o.starts_with("sha256=") => {
                uri.sha256 = format!("sha256:{}", &o["sha256=".len()..]);
            }
            o if o.starts_with("as=") => uri.output_file = o["as=".len()..].to_owned(),
            _ => break,
        }
        rest = head;
    }
    if rest.is_empty() {
        return Err(format!("{s:?}: no URL"));
    }
    uri.value = rest.to_owned();
    Ok(uri)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))
}

/// Runs the task; the exit code is the task's.
pub async fn run(args: RunArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agora: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn stem(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| {
            s.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect()
        })
        .filter(|s: &String| !s.is_empty())
        .unwrap_or_else(|| "task".into())
}

async fn run_inner(args: RunArgs) -> anyhow::Result<ExitCode> {
    let master = master_url(&args.master);
    // A bundle is checked before anything is sent anywhere.
    let bundle = match &args.file {
        Some(f) if is_bundle(f) => Some(
            agora_sdk::bundle::Bundle::open(f)
                .with_context(|| format!("bundle {}", f.display()))?,
        ),
        _ => None,
    };
    let module = match (&args.file, &bundle) {
        (Some(f), None) => {
            Some(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
        }
        _ => None,
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| match (&bundle, &args.file) {
            (Some(b), _) => b.manifest.name.clone(),
            (None, Some(f)) => stem(f),
            (None, None) => "cmd".into(),
        });
    let need: Resources = match &bundle {
        Some(b) => b.manifest.resources()?,
        None => [
            Resource::scalar("cpus", args.cpus),
            Resource::scalar("mem", args.mem),
        ]
        .into_iter()
        .collect::<Result<_, _>>()
        .context("--cpus and --mem")?,
    };
    let uploaded = match &bundle {
        Some(b) => {
            let bar = crate::upload_bar(&name);
            let p = bar.clone();
            let u = b
                .upload(&master, move |_, sent, total| {
                    p.set_length(total);
                    p.set_position(sent);
                })
                .await
                .context("uploading the bundle to the master's blob store")?;
            bar.finish_and_clear();
            Some(u)
        }
        None => None,
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let task_id =
        TaskId::new(format!("{name}-{}-{nanos:09}", std::process::id())).context("task id")?;
    let mut config = SchedulerConfig::new(master.clone(), format!("agora-run {name}"));
    /// How long the master keeps this run's task if the process dies.
    const RUN_FAILOVER_TIMEOUT: Duration = Duration::from_secs(10);
    // If this process dies, its task goes with it (once this timeout passes); a master
    // failover within it is survived: the driver finds the new leader and re-subscribes.
    config.framework.failover_timeout = RUN_FAILOVER_TIMEOUT.as_secs_f64();
    config.reconnect = true;
    let (scheduler, mut events) = subscribe(config)
        .await
        .context("subscribing to the master")?;

    let started = Instant::now();
    let say = |what: &str| eprintln!("[{:>8.3}s] {what}", started.elapsed().as_secs_f64());
    let builder = match (&uploaded, module, &args.cmd) {
        (Some(u), _, _) => u.task(task_id.clone())?,
        (None, Some(m), _) => TaskBuilder::wasm(task_id.clone(), m)
            .name(&name)
            .resources(need.clone()),
        (None, None, Some(c)) => TaskBuilder::command(task_id.clone(), c.clone())
            .name(&name)
            .resources(need.clone()),
        (None, None, None) => anyhow::bail!("give a Wasm file, a bundle or --cmd"),
    };
    let mut builder = builder.args(args.args.clone());
    for g in &args.grants {
        builder = apply(builder, g);
    }
    if let Some(path) = &args.input {
        builder = builder
            .input(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    }
    for (k, v) in &args.env {
        builder = builder.env(k, v);
    }
    if let Some(f) = args.fuel {
        builder = builder.fuel(f);
    }
    if let Some(t) = args.timeout {
        builder = builder.max_duration(t.as_secs_f64());
    }
    for u in &args.uris {
        builder = builder.uri(u.clone());
    }
    for w in &args.require_isolation {
        builder = builder.require_isolation(w);
    }
    if let Some(u) = &args.user {
        builder = builder.user(u);
    }
    let mut builder = Some(builder);

    let deadline = tokio::time::sleep(args.offer_wait);
    tokio::pin!(deadline);
    let ctrl_c = shutdown_signal();
    tokio::pin!(ctrl_c);
    let mut launched_on: Option<v1::Offer> = None;
    let mut reconnecting = false;
    let last: v1::TaskStatus = loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = &mut deadline, if launched_on.is_none() => {
                let _ = scheduler.teardown().await;
                bail!("no offer with {need} arrived within {:?}; is an agent with enough free resources registered?", args.offer_wait);
            }
            () = &mut ctrl_c => {
                say("interrupted; tearing the framework down (the task is killed)");
                let _ = scheduler.teardown().await;
                return Ok(ExitCode::from(130));
            }
        };
        let Some(event) = event else {
            bail!("the master ended the subscription")
        };
        match event {
            Event::Offers(offers) => {
                let mut decline = Vec::new();
                for offer in offers {
                    let fits = OfferPool::new(&offer)
                        .map(|p| p.fits(&need))
                        .unwrap_or(false);
                    match builder.take() {
                        Some(b) if fits => {
                            let id = offer
                                .id
                                .clone()
                                .ok_or_else(|| anyhow!("offer without an id"))?;
                            say(&format!(
                                "launching {task_id} on {} ({need})",
                                offer.hostname
                            ));
                            scheduler
                                .accept(&[id], vec![b.build_for(&offer)], Some(0.0))
                                .await
                                .context("accepting the offer")?;
                            launched_on = Some(offer);
                        }
                        other => {
                            builder = other;
                            decline.extend(offer.id);
                        }
                    }
                }
                if !decline.is_empty() {
                    scheduler
                        .decline(&decline, Some(1.0))
                        .await
                        .context("declining offers")?;
                }
            }
            Event::Update(status) => {
                let state = state_from_proto(status.state());
                let mut line = state
                    .map_or("TASK_STATE_UNSPECIFIED", TaskState::name)
                    .to_owned();
                if status.reason != 0 {
                    line.push_str(&format!(" ({})", reason_name(status.reason())));
                }
                if let Some(p) = status.progress {
                    line.push_str(&format!(" [{:.0}%]", p * 100.0));
                }
                if !status.message.is_empty() {
                    line.push_str(": ");
                    line.push_str(status.message.lines().next().unwrap_or_default());
                }
                say(&line);
                if state.is_some_and(TaskState::is_terminal) {
                    break status;
                }
            }
            Event::Message { data, .. } => {
                let text = String::from_utf8_lossy(&data);
                let text: String = text.chars().take(200).collect();
                say(&format!("message from the task: {text}"));
            }
            Event::Error(message) => bail!("the master reported: {message}"),
            Event::Disconnected { reason } => {
                say(&format!("lost the master ({reason}); finding the leader"));
                reconnecting = true;
            }
            Event::Failure { message, .. } => say(&message),
            Event::Subscribed { .. } if reconnecting => {
                reconnecting = false;
                say(&format!("subscribed again, at {}", scheduler.master()));
                // Updates sent while away are re-sent by the agent; ask anyway, naming the
                // agent, so that a task the old leader never got to it is answered too.
                if let Some(offer) = &launched_on {
                    let agent = offer
                        .agent_id
                        .clone()
                        .and_then(|a| agora_core::AgentId::try_from(a).ok());
                    let _ = scheduler.reconcile_on(&[(task_id.clone(), agent)]).await;
                }
            }
            Event::Subscribed { .. } | Event::Rescind(_) => {}
        }
    };

    // Let the acknowledgement of the terminal update go out before leaving.
    tokio::time::sleep(Duration::from_millis(20)).await;
    if let Some(offer) = &launched_on {
        print_output(&master, offer, &scheduler, &task_id).await;
    }
    if !last.data.is_empty() {
        // An agora:task component's output.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = out.write_all(&last.data);
        if !last.data.ends_with(b"\n") {
            let _ = out.write_all(b"\n");
        }
        let _ = out.flush();
    }
    let _ = scheduler.teardown().await;
    let state = state_from_proto(last.state());
    if state == Some(TaskState::Finished) {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "agora: task {} {}: {}",
        task_id,
        state.map_or("TASK_STATE_UNSPECIFIED", TaskState::name),
        if last.reason != 0 {
            format!("{}: {}", reason_name(last.reason()), last.message)
        } else {
            last.message.clone()
        }
    );
    Ok(match last.exit_code {
        Some(code) if (1..=255).contains(&code) => ExitCode::from(code as u8),
        _ => ExitCode::FAILURE,
    })
}

async fn print_output(
    master: &str,
    offer: &v1::Offer,
    scheduler: &agora_sdk::Scheduler,
    task: &TaskId,
) {
    let Some(framework) = scheduler.framework_id() else {
        return;
    };
    let endpoint = match Operator::connect(master).await {
        Ok(op) => op.state().await.ok().and_then(|s| {
            s.agents
                .into_iter()
                .find(|a| a.id == offer.agent_id)
                .and_then(|a| a.info.map(|i| i.endpoint))
        }),
        Err(_) => None,
    };
    let Some(endpoint) = endpoint else {
        eprintln!("agora: cannot find the agent's address to read the task's output");
        return;
    };
    use std::io::Write;
    for (file, to_stdout) in [("stdout", true), ("stderr", false)] {
        match read_sandbox_file(&endpoint, &framework, task, file).await {
            Ok(bytes) if to_stdout => {
                let _ = std::io::stdout().write_all(&bytes);
                let _ = std::io::stdout().flush();
            }
            Ok(bytes) => {
                let _ = std::io::stderr().write_all(&bytes);
            }
            Err(e) => eprintln!("agora: reading the task's {file}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse() {
        assert_eq!(parse_grant("sandbox").unwrap(), Grant::Sandbox);
        assert_eq!(
            parse_grant("connect:127.0.0.1:80").unwrap(),
            Grant::Connect("127.0.0.1:80".into())
        );
        assert_eq!(
            parse_grant("volume:data:/data:ro").unwrap(),
            Grant::Volume {
                name: "data".into(),
                path: "/data".into(),
                read_only: true
            }
        );
        assert!(parse_grant("network").is_err());
        assert!(parse_grant("volume:data").is_err());
    }

    #[test]
    fn uris_take_options_after_commas() {
        let u = parse_uri("https://h/a,b.tgz,extract,cache,sha256=ab,as=x.tgz").unwrap();
        assert_eq!(u.value, "https://h/a,b.tgz");
        assert!(u.extract && u.cache && !u.executable);
        assert_eq!(
            (u.sha256.as_str(), u.output_file.as_str()),
            ("sha256:ab", "x.tgz")
        );
        let u = parse_uri("file:///bin/tool,executable").unwrap();
        assert_eq!((u.value.as_str(), u.executable), ("file:///bin/tool", true));
        assert!(parse_uri(",cache").is_err());
    }
}
