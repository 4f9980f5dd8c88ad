//! Lists of masters: every client of the SDK takes `a:5050,b:5050,c:5050` where it takes
//! one master, and finds the leader with [`agora_proto::dial::find_leader`].

use std::time::Duration;

use agora_proto::dial::{DialError, Failure};
use agora_proto::tls::Credentials;
use tonic::transport::{Channel, Endpoint};

use crate::Error;

pub use agora_proto::dial::DialPolicy;

/// The masters of a `--master` list, each with a scheme and checked to be dialable.
///
/// # Errors
/// [`Error::Invalid`] when the list is empty or names an address tonic cannot dial.
pub fn parse(list: &str) -> Result<Vec<String>, Error> {
    let masters = agora_proto::leader::masters(list).map_err(Error::Invalid)?;
    for m in &masters {
        Endpoint::from_shared(m.clone())
            .map_err(|e| Error::Invalid(format!("master address {m:?}: {e}")))?;
    }
    Ok(masters)
}

/// The credentials named by the environment (`AGORA_CA`, `AGORA_CERT`, `AGORA_KEY`), read
/// once per process; clients that are given none use these.
///
/// # Errors
/// [`Error::Invalid`] when a file they name cannot be read.
pub fn env_credentials() -> Result<Option<Credentials>, Error> {
    static ENV: std::sync::OnceLock<Result<Option<Credentials>, String>> =
        std::sync::OnceLock::new();
    ENV.get_or_init(|| Credentials::from_env().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Invalid)
}

/// A connection to `url` (over TLS with `tls`); with `keep_alive`, HTTP/2 pings notice a
/// dead master.
pub(crate) async fn channel(
    url: &str,
    keep_alive: bool,
    tls: Option<&Credentials>,
) -> Result<Channel, Failure<Error>> {
    let mut endpoint = agora_proto::tls::endpoint(url, tls)
        .map_err(|e| Failure::Unreachable(format!("invalid address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if keep_alive {
        endpoint = endpoint
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
    }
    endpoint
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(format!("connecting: {}", error_chain(&e))))
}

/// What a status means to the search, with refusals as SDK errors.
pub(crate) fn status_failure(s: tonic::Status) -> Failure<Error> {
    Failure::from(s).map(Error::from)
}

impl From<DialError<Error>> for Error {
    fn from(e: DialError<Error>) -> Self {
        match e {
            DialError::Refused { error, .. } => error,
            DialError::NoLeader(n) => Error::Connection(n.to_string()),
        }
    }
}

/// tonic's top-level transport messages ("transport error") hide the cause.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
