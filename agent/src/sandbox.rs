//! Task sandboxes on disk, and the Sandbox API that serves their files.
//!
//! Layout under the agent's work directory:
//!
//! ```text
//! frameworks/<framework_id>/tasks/<task_id>/runs/<run>/   one directory per launch
//!     stdout, stderr                                      the task's output
//! frameworks/<framework_id>/executors/<executor_id>/runs/<run>/   a custom executor's
//! fetch-cache/                                            the fetcher's cache
//! modules/<hex>.wasm                                      the Wasm module store (bounded)
//! wasm-cache/<engine>/<hex>.<kind>.cwasm                  compiled modules (bounded)
//! ```
//!
//! A run directory is removed by [`crate::gc`] some time after its task or executor ended.
//!
//! Run directory names sort in launch order, so the latest run of a task is the greatest name.
//! Files are read through a capability handle on the run directory: a path that climbs out
//! with `..`, or a symlink a task planted, cannot reach the rest of the host.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use agora_core::{FrameworkId, TaskId};
use agora_proto::required;
use agora_proto::v1::{self, sandbox_server::Sandbox};
use cap_std::ambient_authority;
use cap_std::fs::Dir;
use tonic::{Request, Response, Status};

/// Most bytes one ReadFile returns.
pub const MAX_READ: u64 = 1 << 20;
/// Bytes returned when a ReadFile asks for none in particular.
pub const DEFAULT_READ: u64 = 64 << 10;

pub fn task_dir(work_dir: &Path, framework: &FrameworkId, task: &TaskId) -> PathBuf {
    work_dir
        .join("frameworks")
        .join(framework.as_str())
        .join("tasks")
        .join(task.as_str())
}

/// A new, empty run directory for a launch of `task`.
///
/// # Errors
/// When the directory cannot be created.
pub fn create_run_dir(
    work_dir: &Path,
    framework: &FrameworkId,
    task: &TaskId,
) -> std::io::Result<PathBuf> {
    new_run(task_dir(work_dir, framework, task))
}

/// A new, empty run directory for a start of a custom executor.
///
/// # Errors
/// When the directory cannot be created.
pub fn create_executor_run_dir(
    work_dir: &Path,
    framework: &FrameworkId,
    executor: &agora_core::ExecutorId,
) -> std::io::Result<PathBuf> {
    new_run(
        work_dir
            .join("frameworks")
            .join(framework.as_str())
            .join("executors")
            .join(executor.as_str()),
    )
}

fn new_run(parent: PathBuf) -> std::io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let name = format!(
        "{nanos:024}-{:06}",
        SEQ.fetch_add(1, Ordering::Relaxed) % 1_000_000
    );
    let dir = parent.join("runs").join(name);
    // Sandbox GC removes parents it leaves empty; one removed between the creation of a
    // parent and of its child makes the child's creation fail: try again.
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 5 => tries += 1,
            // Private from birth (the agent's own, 0700): a native task's is then given to
            // its user; one of a Wasm task stays the agent's.
            r => {
                r?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
        }
    }
}

/// The latest run directory of `task`, if it ever ran here.
pub fn latest_run_dir(work_dir: &Path, framework: &FrameworkId, task: &TaskId) -> Option<PathBuf> {
    let runs = task_dir(work_dir, framework, task).join("runs");
    std::fs::read_dir(&runs)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .max()
        .map(|name| runs.join(name))
}

/// Reads up to `length` bytes at `offset` of `path` inside `run_dir`.
///
/// # Errors
/// `NotFound` for a missing file, `InvalidArgument` for a path that leaves the sandbox.
pub fn read_file(
    run_dir: &Path,
    path: &str,
    offset: u64,
    length: u64,
) -> Result<v1::ReadFileResponse, Status> {
    if path.is_empty() || Path::new(path).is_absolute() {
        return Err(Status::invalid_argument(format!(
            "path {path:?} must be relative to the sandbox"
        )));
    }
    let dir = Dir::open_ambient_dir(run_dir, ambient_authority())
        .map_err(|e| Status::not_found(format!("sandbox {}: {e}", run_dir.display())))?;
    // Non-blocking: a FIFO a task planted would otherwise hold this thread until a writer
    // came; regular files read the same either way.
    let mut options = cap_std::fs::OpenOptions::new();
    options.read(true);
    cap_std::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = dir.open_with(path, &options).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(format!("{path} is not in the sandbox")),
        _ => Status::invalid_argument(format!("cannot open {path:?} in the sandbox: {e}")),
    })?;
    let mut file = file.into_std();
    let size = file
        .metadata()
        .map_err(|e| Status::internal(e.to_string()))?
        .len();
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        return Err(Status::invalid_argument(format!(
            "{path} is not a regular file"
        )));
    }
    let want = match length {
        0 => DEFAULT_READ,
        n => n.min(MAX_READ),
    };
    let mut data = Vec::new();
    if offset < size {
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| Status::internal(e.to_string()))?;
        file.take(want)
            .read_to_end(&mut data)
            .map_err(|e| Status::internal(e.to_string()))?;
    }
    let eof = offset + data.len() as u64 >= size;
    Ok(v1::ReadFileResponse { data, size, eof })
}

/// The Sandbox gRPC service of an agent.
#[derive(Clone)]
pub struct SandboxService {
    pub work_dir: PathBuf,
    pub containers: crate::containerizer::Containers,
    /// Reads the agent's metrics now.
    pub metrics: std::sync::Arc<dyn Fn() -> Vec<(String, f64)> + Send + Sync>,
    /// Over TLS, callers present a client (operator) or master certificate of the cluster
    /// CA: sandboxes hold tasks' output.
    pub authenticate: bool,
}

impl SandboxService {
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        use agora_proto::tls::Kind;
        if !self.authenticate {
            return Ok(());
        }
        match agora_proto::tls::principal(request) {
            Some(p) if matches!(p.kind, Kind::Client | Kind::Master) => Ok(()),
            Some(p) => Err(Status::permission_denied(format!(
                "this certificate is of {p}; the sandbox API takes client certificates"
            ))),
            None => Err(Status::unauthenticated(
                "this agent authenticates its callers: present a client certificate of the cluster CA (AGORA_CERT, AGORA_KEY)",
            )),
        }
    }
}

#[tonic::async_trait]
impl Sandbox for SandboxService {
    async fn get_metrics(
        &self,
        request: Request<v1::GetMetricsRequest>,
    ) -> Result<Response<v1::GetMetricsResponse>, Status> {
        self.authenticate(&request)?;
        Ok(Response::new(v1::GetMetricsResponse {
            metrics: (self.metrics)().into_iter().collect(),
        }))
    }

    async fn get_containers(
        &self,
        request: Request<v1::GetContainersRequest>,
    ) -> Result<Response<v1::GetContainersResponse>, Status> {
        self.authenticate(&request)?;
        let entries: Vec<_> = self
            .containers
            .lock()
            .map_err(|_| Status::internal("container registry poisoned"))?
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        // Reading cgroup files is blocking I/O.
        let containers = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|(k, e)| v1::ContainerStatus {
                    framework_id: Some((&k.framework).into()),
                    task_id: k.task.as_ref().map(Into::into),
                    containerizer: e.containerizer.to_owned(),
                    usage: e.probe.as_ref().map(|p| p()),
                    executor_id: k.executor.as_ref().map(Into::into),
                    pid: e.pid.load(std::sync::atomic::Ordering::Relaxed),
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::GetContainersResponse { containers }))
    }

    async fn read_file(
        &self,
        request: Request<v1::ReadFileRequest>,
    ) -> Result<Response<v1::ReadFileResponse>, Status> {
        self.authenticate(&request)?;
        let r = request.into_inner();
        let framework = FrameworkId::try_from(required(r.framework_id, "framework_id")?)?;
        let task = TaskId::try_from(required(r.task_id, "task_id")?)?;
        let work_dir = self.work_dir.clone();
        let resp = tokio::task::spawn_blocking(move || {
            let run = latest_run_dir(&work_dir, &framework, &task).ok_or_else(|| {
                Status::not_found(format!(
                    "task {task} of framework {framework} has no sandbox on this agent"
                ))
            })?;
            read_file(&run, &r.path, r.offset, r.length)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_in_the_sandbox_is_refused_without_blocking() {
        let run = tempfile::tempdir().unwrap();
        let fifo =
            std::ffi::CString::new(run.path().join("p").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK the open waits for a writer that never comes.
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = run.path().to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(read_file(&dir, "p", 0, 0));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the read returns at once");
        let e = r.unwrap_err();
        assert!(e.message().contains("not a regular file"), "{e:?}");
    }

    #[test]
    fn reads_inside_and_refuses_escapes() {
        let work = tempfile::tempdir().unwrap();
        let fw = FrameworkId::new("fw").unwrap();
        let task = TaskId::new("t1").unwrap();
        let first = create_run_dir(work.path(), &fw, &task).unwrap();
        let run = create_run_dir(work.path(), &fw, &task).unwrap();
        // Private from birth, whoever runs in it.
        assert_eq!(
            std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(latest_run_dir(work.path(), &fw, &task).unwrap(), run);
        assert_ne!(first, run);
        std::fs::write(run.join("stdout"), "hello sandbox\n").unwrap();
        let r = read_file(&run, "stdout", 0, 0).unwrap();
        assert_eq!(r.data, b"hello sandbox\n");
        assert!(r.eof);
        assert_eq!(r.size, 14);
        let r = read_file(&run, "stdout", 6, 3).unwrap();
        assert_eq!(r.data, b"san");
        assert!(!r.eof);

        let secret = work.path().join("secret");
        std::fs::write(&secret, "agent-only").unwrap();
        std::os::unix::fs::symlink(&secret, run.join("planted")).unwrap();
        assert_eq!(
            read_file(&run, "planted", 0, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            read_file(&run, "../../../../secret", 0, 0)
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            read_file(&run, "/etc/hostname", 0, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            read_file(&run, "missing", 0, 0).unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
