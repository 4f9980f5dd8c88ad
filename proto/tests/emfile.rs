//! Accepting with a full file table. A test binary of its own: it lowers the process's
//! open-file limit, which would fail whatever else ran beside it.

use std::time::Duration;

use agora_proto::listen::{Incoming, bind};
use tokio_stream::StreamExt;

fn nofile() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    limit
}

fn set_nofile(limit: libc::rlimit) {
    // SAFETY: setrlimit reads only the struct it is given.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// The highest file descriptor open in this process.
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .expect("some descriptor is open")
}

/// EMFILE pauses accepting rather than ending the listener (or spinning): the connection
/// waits in the queue, and is served once descriptors are free again.
#[tokio::test(flavor = "current_thread")]
async fn a_full_file_table_pauses_accepting_until_descriptors_are_free() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Incoming::new(listener, Duration::from_secs(10));
    let client = std::net::TcpStream::connect(addr).unwrap();

    let before = nofile();
    // Every descriptor number up to the highest open one is taken or reusable; with the
    // limit just above it and the gaps filled, accept(2) has none left.
    let top = highest_fd();
    let mut fillers = Vec::new();
    set_nofile(libc::rlimit {
        rlim_cur: top + 1,
        rlim_max: before.rlim_max,
    });
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }
    let full = tokio::time::timeout(Duration::from_millis(500), incoming.next()).await;
    let full = full.map(|c| c.map(|c| c.map(drop).map_err(|e| e.to_string())));
    assert!(
        full.is_err(),
        "with no descriptor free, the listener waits (it yielded {full:?})"
    );

    drop(fillers);
    set_nofile(before);
    let served = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .expect("accepted once descriptors are free")
        .expect("the listener goes on");
    assert!(served.is_ok());
    drop(client);
}
