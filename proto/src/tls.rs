//! TLS between Agora's processes, and the principal a certificate names.
//!
//! A cluster has one CA (`agora cert init`). Every certificate it issues
//! (`agora cert issue master|agent|client NAME`) names its principal in the subject's common
//! name and its kind in the organizational unit (`agora-master`, `agora-agent`,
//! `agora-client`), and is good for both ends of a connection, so that masters and agents
//! present the same certificate when they serve and when they call.
//!
//! Servers verify a client certificate whenever one is presented (and refuse the handshake
//! if the cluster CA did not sign it, or it has expired); whether a call needs one is the
//! service's decision, from [`principal`]. A client with [`Credentials`] always dials TLS,
//! whatever scheme the address came with, so that a follower's `host:port` hint is followed
//! over TLS too.

use std::path::{Path, PathBuf};

use std::sync::{Arc, PoisonError, RwLock};

use tokio_rustls::rustls::ServerConfig;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The kind of principal a certificate was issued to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Master,
    Agent,
    Client,
}

impl Kind {
    /// The organizational unit that marks the kind in a certificate.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Master => "agora-master",
            Kind::Agent => "agora-agent",
            Kind::Client => "agora-client",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Master => "master",
            Kind::Agent => "agent",
            Kind::Client => "client",
        }
    }

    fn from_unit(unit: &str) -> Option<Kind> {
        [Kind::Master, Kind::Agent, Kind::Client]
            .into_iter()
            .find(|k| k.unit() == unit)
    }
}

/// Who a verified certificate says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub kind: Kind,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.name(), self.name)
    }
}

/// What could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct KeyPair {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Reads `cert` and `key` (PEM files).
    ///
    /// # Errors
    /// When either cannot be read.
    pub fn load(cert: &Path, key: &Path) -> Result<KeyPair, TlsError> {
        Ok(KeyPair {
            cert: read("the certificate", cert)?,
            key: read("the key", key)?,
        })
    }
}

/// What a client trusts (the cluster CA) and, if it has one, the certificate it presents.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The cluster CA's certificate, PEM.
    pub ca: Vec<u8>,
    pub identity: Option<KeyPair>,
}

/// Environment variables a client's credentials are read from when not given.
pub const ENV_CA: &str = "AGORA_CA";
pub const ENV_CERT: &str = "AGORA_CERT";
pub const ENV_KEY: &str = "AGORA_KEY";

impl Credentials {
    /// Reads the CA's certificate and, when both are given, the client's certificate and key.
    ///
    /// # Errors
    /// When a file cannot be read, or only one of `cert` and `key` is given.
    pub fn load(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, TlsError> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some(KeyPair::load(c, k)?),
            (None, None) => None,
            _ => {
                return Err(TlsError::Config(
                    "a client certificate needs its key, and a key its certificate".into(),
                ));
            }
        };
        Ok(Credentials {
            ca: read("the CA certificate", ca)?,
            identity,
        })
    }

    /// The credentials named by `AGORA_CA`, `AGORA_CERT` and `AGORA_KEY`; `None` when
    /// `AGORA_CA` is not set.
    ///
    /// # Errors
    /// When a named file cannot be read.
    pub fn from_env() -> Result<Option<Self>, TlsError> {
        let var = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let Some(ca) = var(ENV_CA) else {
            return Ok(None);
        };
        Credentials::load(&ca, var(ENV_CERT).as_deref(), var(ENV_KEY).as_deref()).map(Some)
    }

    fn client_config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some(id) = &self.identity {
            c = c.identity(Identity::from_pem(&id.cert, &id.key));
        }
        c
    }
}

/// Where `agora dev` leaves the credentials of its clusters, one directory per master
/// address (`127.0.0.1-5050`): `$AGORA_HOME/dev`, else `$HOME/.agora/dev`.
pub fn dev_root() -> Option<PathBuf> {
    let var = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("AGORA_HOME")
        .map(|h| h.join("dev"))
        .or_else(|| var("HOME").map(|h| h.join(".agora").join("dev")))
}

/// The directory of a dev cluster's master at `addr` (any scheme) under `root`.
pub fn dev_dir(root: &Path, addr: &str) -> PathBuf {
    root.join(crate::leader::host_port(addr).replace([':', '/'], "-"))
}

/// The client credentials `agora dev` left for the master at `addr` under `root`, if a dev
/// cluster that is still running left them (its `pid` file names a live process).
///
/// # Errors
/// When they are there but cannot be read.
pub fn dev_credentials(root: &Path, addr: &str) -> Result<Option<Credentials>, TlsError> {
    let dir = dev_dir(root, addr);
    let alive = std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    if !alive {
        return Ok(None);
    }
    Credentials::load(
        &dir.join("ca.pem"),
        Some(&dir.join("client.pem")),
        Some(&dir.join("client.key")),
    )
    .map(Some)
}

/// The endpoint of `url`: over TLS with `credentials` (an `http://` address is dialled as
/// `https://`), in the clear without. An `https://` address without credentials is refused,
/// naming what it needs.
///
/// # Errors
/// When `url` is not an address tonic can dial, or needs credentials it was not given.
pub fn endpoint(url: &str, credentials: Option<&Credentials>) -> Result<Endpoint, String> {
    match credentials {
        Some(c) => {
            let url = match url.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => url.to_owned(),
            };
            Endpoint::from_shared(url)
                .and_then(|e| e.tls_config(c.client_config()))
                .map_err(|e| e.to_string())
        }
        None if url.starts_with("https://") => Err(format!(
            "{url} is served over TLS: give the cluster CA (--ca, or {ENV_CA})"
        )),
        None => Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string()),
    }
}

/// A server's TLS: its certificate and key, and the CA whose client certificates it
/// accepts. Clones share one state, which [`ServerTls::reload`] replaces: new connections
/// (served, and dialled with [`ServerTls::as_client`]) use the files as they are then, and
/// connections already open keep what they were made with.
#[derive(Clone)]
pub struct ServerTls {
    files: Option<Arc<Files>>,
    current: Arc<RwLock<Arc<Loaded>>>,
}

/// Where a server's TLS was read from, to read again.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// One reading of a server's files, made into rustls's configurations.
struct Loaded {
    identity: KeyPair,
    ca: Vec<u8>,
    /// Verifies a client certificate when one is presented.
    optional: Arc<ServerConfig>,
    /// Needs one in the handshake.
    required: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// The cryptography every TLS configuration here uses (tonic's and reqwest's too): naming it
/// keeps rustls from having to pick one when more than one is built in.
fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider())
}

/// HTTP/2 first, as gRPC clients insist on; HTTP/1.1 for the plain HTTP endpoints.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

impl Loaded {
    fn new(identity: KeyPair, ca: Vec<u8>) -> Result<Loaded, TlsError> {
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: &dyn std::fmt::Display| TlsError::Config(format!("{what}: {e}"));
        let chain = CertificateDer::pem_slice_iter(&identity.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("the certificate is not PEM", &e))?;
        if chain.is_empty() {
            return Err(TlsError::Config(
                "the certificate file holds no certificate".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&identity.key)
            .map_err(|e| bad("the key is not a PEM private key", &e))?;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| bad("the CA certificate is not PEM", &e))?;
            roots.add(c).map_err(|e| bad("the CA certificate", &e))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Config("the CA file holds no certificate".into()));
        }
        let roots = Arc::new(roots);
        let config = |required: bool| -> Result<Arc<ServerConfig>, TlsError> {
            use tokio_rustls::rustls::server::WebPkiClientVerifier;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider());
            let verifier = if required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            }
            .build()
            .map_err(|e| bad("the CA certificate", &e))?;
            let mut c = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| bad("TLS versions", &e))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| bad("the certificate and key", &e))?;
            c.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Loaded {
            optional: config(false)?,
            required: config(true)?,
            identity,
            ca,
        })
    }
}

impl ServerTls {
    /// Reads the server's certificate, key and the cluster CA, and checks that they make a
    /// TLS configuration; [`ServerTls::reload`] reads the same files again.
    ///
    /// # Errors
    /// When a file cannot be read, or they do not make a configuration (not PEM, a key that
    /// is not the certificate's).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let files = Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: ca.to_owned(),
        };
        let loaded = files.read()?;
        Ok(ServerTls {
            files: Some(Arc::new(files)),
            current: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    /// Reads the files again and, if they make a configuration, uses them from now on.
    /// On an error nothing changes: the server goes on with what it had.
    ///
    /// # Errors
    /// When a file cannot be read or they do not make a configuration.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Some(files) = &self.files else {
            return Ok(());
        };
        let loaded = Arc::new(files.read()?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = loaded;
        Ok(())
    }

    fn loaded(&self) -> Arc<Loaded> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The configuration new connections are accepted with: client certificates are
    /// verified when presented (a call that needs one checks [`principal`]); with
    /// `require_client`, the handshake needs one.
    pub fn server_config(&self, require_client: bool) -> Arc<ServerConfig> {
        let l = self.loaded();
        Arc::clone(if require_client {
            &l.required
        } else {
            &l.optional
        })
    }

    /// What this server presents to the servers it calls (masters to their peers, agents to
    /// their masters), as its files are now.
    pub fn as_client(&self) -> Credentials {
        let l = self.loaded();
        Credentials {
            ca: l.ca.clone(),
            identity: Some(l.identity.clone()),
        }
    }
}

impl Files {
    fn read(&self) -> Result<Loaded, TlsError> {
        Loaded::new(
            KeyPair::load(&self.cert, &self.key)?,
            read("the CA certificate", &self.ca)?,
        )
        .map_err(|e| {
            TlsError::Config(format!(
                "{e} (read from {}, {} and {})",
                self.cert.display(),
                self.key.display(),
                self.ca.display()
            ))
        })
    }
}

/// The principal of the certificate a caller presented on this connection (the handshake
/// verified it against the cluster CA); `None` without TLS, without a certificate, or with
/// one that names no Agora principal.
pub fn principal<T>(request: &tonic::Request<T>) -> Option<Principal> {
    principal_in(request.extensions())
}

/// The principal of the certificate presented on the connection a request (gRPC or plain
/// HTTP) came on, from the request's extensions.
pub fn principal_in(extensions: &tonic::codegen::http::Extensions) -> Option<Principal> {
    let peer = crate::listen::peer(extensions)?;
    principal_of(peer.certificates.as_ref()?.first()?.as_ref())
}

/// Certificates whose principals are remembered: callers present the same few on every
/// call, and parsing one each time was a measurable part of a secured call.
const REMEMBERED: usize = 4096;

/// The principal a DER certificate names: its common name and the kind in its
/// organizational unit. Remembered by the certificate's bytes (at most [`REMEMBERED`];
/// past that the memory starts over).
pub fn principal_of(der: &[u8]) -> Option<Principal> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<Vec<u8>, Option<Principal>>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Mutex::default);
    if let Some(p) = seen.lock().unwrap_or_else(PoisonError::into_inner).get(der) {
        return p.clone();
    }
    let p = parse_principal(der);
    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    if seen.len() >= REMEMBERED {
        seen.clear();
    }
    seen.insert(der.to_vec(), p.clone());
    p
}

fn parse_principal(der: &[u8]) -> Option<Principal> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let kind = subject
        .iter_organizational_unit()
        .find_map(|u| u.as_str().ok().and_then(Kind::from_unit))?;
    Some(Principal { name, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_make_every_address_tls_and_tls_needs_credentials() {
        let creds = Credentials {
            ca: Vec::new(),
            identity: None,
        };
        let e = endpoint("http://127.0.0.1:5050", Some(&creds)).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("https"));
        let e = endpoint("http://127.0.0.1:5050", None).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("http"));
        let err = endpoint("https://127.0.0.1:5050", None).unwrap_err();
        assert!(err.contains("--ca"), "{err}");
    }

    #[test]
    fn half_an_identity_is_refused() {
        let dir = std::env::temp_dir();
        let e = Credentials::load(&dir.join("ca.pem"), Some(&dir.join("c.pem")), None);
        assert!(matches!(e, Err(TlsError::Config(_))), "{e:?}");
    }
}
