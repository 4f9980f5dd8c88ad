//! The fetcher through the whole cluster: tasks' URIs from a real HTTP server on loopback
//! (and from files), verified, extracted and cached by the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_core::TaskState;
use agora_proto::v1;
use agora_sdk::{agent_metrics, read_sandbox_file, task::uri};
use sha2::Digest;

use crate::native::{cgroups_left, command, endpoint, start};
use crate::*;

/// An HTTP/1.1 server of fixed files that counts the requests for each path.
#[derive(Clone)]
struct Files {
    port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl Files {
    async fn serve(files: Vec<(&str, Vec<u8>, Duration)>) -> Files {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let files: Arc<HashMap<String, (Vec<u8>, Duration)>> = Arc::new(
            files
                .into_iter()
                .map(|(p, b, d)| (p.to_owned(), (b, d)))
                .collect(),
        );
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (files, counter) = (files.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req);
                    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                    *counter.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let response = match files.get(&path) {
                        Some((body, delay)) => {
                            tokio::time::sleep(*delay).await;
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(body);
                            r
                        }
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = conn.write_all(&response).await;
                });
            }
        });
        Files { port, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn tar_gz(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

async fn metric(cluster: &Cluster, name: &str) -> f64 {
    agent_metrics(&endpoint(cluster).await).await.unwrap()[name]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_is_fetched_verified_extracted_and_then_served_from_the_cache() {
    let test = "an_archive_is_fetched_verified_extracted_and_then_served_from_the_cache";
    let archive = tar_gz(&[
        (
            "tool/run.sh",
            b"#!/bin/sh\necho \"tool ran with $1\"\n",
            0o755,
        ),
        ("tool/data.txt", b"payload\n", 0o644),
    ]);
    let files = Files::serve(vec![("/tool.tar.gz", archive.clone(), Duration::ZERO)]).await;
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("fetch").await;
    let mut u = uri(files.url("/tool.tar.gz"));
    u.extract = true;
    u.cache = true;
    u.sha256 = sha256(&archive);
    let script = "./tool/run.sh x && cat tool/data.txt && ls";
    for id in ["first", "second"] {
        let task = command(id, script, "cpus:0.1;mem:32").uri(u.clone());
        launch(&s, &mut events, task).await;
        let end = wait_terminal(&mut events, &tid(id)).await;
        assert_eq!(state_of(&end), TaskState::Finished, "{id}: {}", end.message);
        let fw = s.framework_id().unwrap();
        let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid(id), "stdout")
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "tool ran with x\npayload\nstderr\nstdout\ntool\n",
            "{id}: unpacked in the sandbox, the archive itself not kept"
        );
    }
    assert_eq!(
        files.hits("/tool.tar.gz"),
        1,
        "the second task hit the cache"
    );
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_cache_hits_total").await,
        1.0
    );
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_cache_misses_total").await,
        1.0
    );
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_cache_bytes").await,
        archive.len() as f64
    );
    assert!(cgroups_left(test).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_fetching_one_uri_download_it_once() {
    let test = "concurrent_tasks_fetching_one_uri_download_it_once";
    let blob = vec![42u8; 1 << 20];
    // Slow enough that all three tasks ask while the first download is under way.
    let files = Files::serve(vec![("/blob", blob, Duration::from_millis(500))]).await;
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("fetch").await;
    let mut u = uri(files.url("/blob"));
    u.cache = true;
    let offer = next_offers(&mut events).await.remove(0);
    let tasks: Vec<v1::TaskInfo> = ["c1", "c2", "c3"]
        .into_iter()
        .map(|id| {
            command(id, "wc -c < blob", "cpus:0.1;mem:32")
                .uri(u.clone())
                .build_for(&offer)
        })
        .collect();
    s.accept(&[offer.id.clone().unwrap()], tasks, Some(0.0))
        .await
        .unwrap();
    let fw = s.framework_id().unwrap();
    let mut ended = HashMap::new();
    while ended.len() < 3 {
        let st = next_matching(&mut events, "c1, c2 and c3 to end", |e| match e {
            agora_sdk::Event::Update(st) if state_of(&st).is_terminal() => Some(st),
            _ => None,
        })
        .await;
        ended.insert(st.task_id.clone().unwrap().value, st);
    }
    for (id, end) in &ended {
        assert_eq!(state_of(end), TaskState::Finished, "{id}: {}", end.message);
    }
    for id in ["c1", "c2", "c3"] {
        let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid(id), "stdout")
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out).trim(), "1048576", "{id}");
    }
    assert_eq!(files.hits("/blob"), 1);
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_downloads_total").await,
        1.0
    );
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_cache_hits_total").await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fetches_fail_the_task_with_the_fetcher_reason() {
    let test = "failed_fetches_fail_the_task_with_the_fetcher_reason";
    let files = Files::serve(vec![("/data", b"real content".to_vec(), Duration::ZERO)]).await;
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("fetch").await;

    let mut wrong = uri(files.url("/data"));
    wrong.sha256 = sha256(b"other content");
    let missing = uri(files.url("/missing"));
    let mut evil = uri(files.url("/data"));
    evil.output_file = "../../escape".into();
    let cases = [
        ("bad-sha", wrong, "sha256 mismatch"),
        ("not-found", missing, "404"),
        ("escape", evil, "inside the sandbox"),
        ("no-host", uri("http://127.0.0.1:1/x"), "127.0.0.1:1"),
    ];
    for (id, u, needle) in cases {
        launch(
            &s,
            &mut events,
            command(id, "echo should not run", "cpus:0.1;mem:32").uri(u),
        )
        .await;
        let end = wait_terminal(&mut events, &tid(id)).await;
        assert_eq!(
            (state_of(&end), end.reason()),
            (TaskState::Failed, v1::Reason::FetcherFailed),
            "{id}: {}",
            end.message
        );
        assert!(end.message.contains(needle), "{id}: {}", end.message);
        let fw = s.framework_id().unwrap();
        let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid(id), "stdout").await;
        assert!(out.is_err(), "{id}: the command did not run");
    }
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_failures_total").await,
        4.0
    );
    assert!(cgroups_left(test).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_wasm_modules_are_fetched_too() {
    let test = "files_and_wasm_modules_are_fetched_too";
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hello.sh");
    std::fs::write(&script, "#!/bin/sh\necho hello from a file\n").unwrap();
    let module = agora_examples::task_bytes("hello", agora_examples::Target::P1);
    let files = Files::serve(vec![("/hello.wasm", module.clone(), Duration::ZERO)]).await;
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("fetch").await;

    let mut u = uri(format!("file://{}", script.display()));
    u.executable = true;
    u.output_file = "bin/hello".into();
    launch(
        &s,
        &mut events,
        command("from-file", "./bin/hello", "cpus:0.1;mem:32").uri(u),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("from-file")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("from-file"), "stdout")
        .await
        .unwrap();
    assert_eq!(out, b"hello from a file\n");

    // A Wasm module named by URL goes through the same cache.
    let mut task = wasm_task("wasm-url", "hello", "cpus:0.1;mem:32")
        .args(["fetched"])
        .build();
    if let Some(v1::task_info::Payload::Wasm(w)) = &mut task.payload {
        w.module = Some(v1::wasm_task::Module::Uri(files.url("/hello.wasm")));
        w.sha256 = sha256(&module);
    }
    launch(&s, &mut events, TaskBuilder::from_info(task)).await;
    let end = wait_terminal(&mut events, &tid("wasm-url")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("wasm-url"), "stdout")
        .await
        .unwrap();
    assert_eq!(out, b"Hello, fetched!\n");
    assert_eq!(files.hits("/hello.wasm"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_uploaded_to_the_master_are_fetched_by_digest() {
    let test = "blobs_uploaded_to_the_master_are_fetched_by_digest";
    let cluster = start(test, None).await;
    let dir = tempfile::tempdir().unwrap();
    let archive = tar_gz(&[("data/words.txt", b"alpha beta\n", 0o644)]);
    let path = dir.path().join("files.tar.gz");
    std::fs::write(&path, &archive).unwrap();
    // Through the command line, as a user would.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["blob", "put", "--master", &cluster.master])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(digest, sha256(&archive));
    // Again through the SDK: the master has it, so nothing is sent.
    let again = agora_sdk::blob::upload_file(&cluster.master, &path, |_, _| {})
        .await
        .unwrap();
    assert_eq!(again, digest);

    let (s, mut events) = cluster.framework("fetch").await;
    let mut u = uri(&digest);
    u.extract = true;
    u.output_file = "files.tar.gz".into();
    for id in ["by-digest", "by-digest-again"] {
        launch(
            &s,
            &mut events,
            command(id, "cat data/words.txt", "cpus:0.1;mem:32").uri(u.clone()),
        )
        .await;
        let end = wait_terminal(&mut events, &tid(id)).await;
        assert_eq!(state_of(&end), TaskState::Finished, "{id}: {}", end.message);
        let fw = s.framework_id().unwrap();
        let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid(id), "stdout")
            .await
            .unwrap();
        assert_eq!(out, b"alpha beta\n");
    }
    // Blobs are content-addressed: always cached.
    assert_eq!(
        metric(&cluster, "agora_agent_fetcher_cache_hits_total").await,
        1.0
    );

    let unknown = uri(format!("sha256:{}", "00".repeat(32)));
    launch(
        &s,
        &mut events,
        command("unknown-blob", "true", "cpus:0.1;mem:32").uri(unknown),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("unknown-blob")).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::FetcherFailed,
        "has no such blob",
    );
}
