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

/// The environment variable of a client's bearer token.
pub const ENV_TOKEN: &str = "AGORA_TOKEN";

/// How a client proves who it is to the masters: a client certificate (with the cluster
/// CA, in `tls`), a bearer token, or both (the token decides).
#[derive(Clone, Default)]
pub struct Auth {
    pub tls: Option<Credentials>,
    pub token: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Auth {
    /// What the environment names: [`env_credentials`] and `AGORA_TOKEN`.
    ///
    /// # Errors
    /// As [`env_credentials`].
    pub fn from_env() -> Result<Auth, Error> {
        Ok(Auth {
            tls: env_credentials()?,
            token: std::env::var(ENV_TOKEN).ok().filter(|t| !t.is_empty()),
        })
    }

    /// What the environment names, else the credentials a running `agora dev` left for
    /// one of `masters` ([`agora_proto::tls::dev_credentials`]): a dev cluster is found
    /// without any setup.
    ///
    /// # Errors
    /// When named or left credentials cannot be read.
    pub fn for_masters(masters: &[String]) -> Result<Auth, Error> {
        let mut auth = Auth::from_env()?;
        if auth.tls.is_none()
            && let Some(root) = agora_proto::tls::dev_root()
        {
            for m in masters {
                if let Some(c) = agora_proto::tls::dev_credentials(&root, m)
                    .map_err(|e| Error::Invalid(e.to_string()))?
                {
                    auth.tls = Some(c);
                    break;
                }
            }
        }
        Ok(auth)
    }

    pub(crate) fn bearer(&self) -> Result<Bearer, Error> {
        self.token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Error::Invalid("the token is not printable ASCII".into()))
            })
            .transpose()
            .map(Bearer)
    }
}

/// Puts the bearer token, if any, on every call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A connection to a master that authenticates as its [`Auth`] says.
pub type Chan = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// A connection to `url` (over TLS with `auth`'s credentials, its token on every call);
/// with `keep_alive`, HTTP/2 pings notice a dead master.
pub(crate) async fn channel(
    url: &str,
    keep_alive: bool,
    auth: &Auth,
) -> Result<Chan, Failure<Error>> {
    let bearer = auth.bearer().map_err(Failure::Refused)?;
    let mut endpoint = agora_proto::tls::endpoint(url, auth.tls.as_ref())
        .map_err(|e| Failure::Unreachable(format!("invalid address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if keep_alive {
        endpoint = endpoint
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(format!("connecting: {}", error_chain(&e))))?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel, bearer,
    ))
}

/// What a status means to the search, with refusals as SDK errors.
pub(crate) fn status_failure(s: tonic::Status) -> Failure<Error> {
    Failure::from(s).map(Error::from)
}

impl From<DialError<Error>> for Error {
    fn from(e: DialError<Error>) -> Self {
        match e {
            DialError::Refused { error, .. } => error,
            DialError::NoLeader(n) => {
                let mut message = n.to_string();
                if let Some(hint) = tls_hint(&message) {
                    message.push_str("; ");
                    message.push_str(hint);
                }
                Error::Connection(message)
            }
        }
    }
}

/// What to say when the failures look like a client and a master that disagree about TLS:
/// a TLS master answers a plaintext HTTP/2 client with an alert, which the client reads as
/// a broken HTTP/2 frame; a plaintext master answers a TLS client with bytes that are no
/// TLS record.
fn tls_hint(failures: &str) -> Option<&'static str> {
    if failures.contains("h2 protocol error") || failures.contains("http2 error") {
        Some(
            "a master that serves TLS answers a client in the clear this way: give the client the cluster CA (AGORA_CA, with AGORA_CERT and AGORA_KEY or AGORA_TOKEN)",
        )
    } else if failures.contains("InvalidContentType") || failures.contains("corrupt message") {
        Some("the master does not seem to serve TLS: dial it without a CA (unset AGORA_CA)")
    } else {
        None
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages tonic and rustls give when client and master disagree about TLS (as
    /// measured: a plaintext CLI against a TLS master, and the other way round).
    #[test]
    fn disagreements_about_tls_get_a_hint() {
        let plain_to_tls = "http://127.0.0.1:5050: h2 protocol error: http2 error";
        assert!(tls_hint(plain_to_tls).unwrap().contains("AGORA_CA"));
        let tls_to_plain = "http://127.0.0.1:5050: connecting: transport error: received corrupt message of type InvalidContentType";
        assert!(
            tls_hint(tls_to_plain)
                .unwrap()
                .contains("does not seem to serve TLS")
        );
        assert_eq!(tls_hint("connection refused"), None);
    }
}
