//! Who is calling: the authenticated principal of every framework and operator call.
//!
//! A caller proves who it is with a client certificate of the cluster CA (kind `client`,
//! over TLS: [`agora_proto::tls`]) or a bearer token (`authorization: Bearer TOKEN`, or
//! HTTP Basic `PRINCIPAL:TOKEN` on the HTTP endpoints, as Mesos's credentials). Tokens are
//! kept on the master only as SHA-256 hashes, in a file of `PRINCIPAL sha256:HEX` lines
//! (`agora token create` writes them).
//!
//! Authentication is on once the master serves TLS or has tokens. Then a call without a
//! principal is refused `UNAUTHENTICATED` (HTTP 401) before it reaches the service, and
//! the principal travels with the request ([`Caller`]) for what the service decides.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use agora_proto::tls::{self, Kind};
use sha2::{Digest, Sha256};
use tonic::Status;

/// The authenticated principal of a call, in its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// Bearer tokens by their SHA-256 hash.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], String>,
}

/// The most tokens a file may hold, and the longest token or principal read.
const MAX_TOKENS: usize = 10_000;
const MAX_TOKEN_BYTES: usize = 512;

impl Tokens {
    /// Reads a tokens file: `PRINCIPAL sha256:HEX` per line; blank lines and `#` comments
    /// are skipped.
    ///
    /// # Errors
    /// When the file cannot be read, or a line is not of that form (naming the line).
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the tokens file {}: {e}", path.display()))?;
        Tokens::parse(&text).map_err(|e| format!("the tokens file {}: {e}", path.display()))
    }

    /// # Errors
    /// As [`Tokens::load`].
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut by_hash = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why} (write PRINCIPAL sha256:HEX)", n + 1);
            let (principal, hash) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("no hash"))?;
            let hex = hash
                .trim()
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("the hash is not sha256:"))?;
            let mut h = [0u8; 32];
            hex::decode_to_slice(hex, &mut h).map_err(|_| bad("not 64 hex digits"))?;
            agora_core::limits::text("principal", principal, 255)
                .map_err(|e| bad(&e.to_string()))?;
            if by_hash.insert(h, principal.to_owned()).is_some() {
                return Err(bad("the same token is listed twice"));
            }
            if by_hash.len() > MAX_TOKENS {
                return Err(format!("more than {MAX_TOKENS} tokens"));
            }
        }
        Ok(Tokens { by_hash })
    }

    /// The line that lists `token` for `principal`.
    pub fn line(principal: &str, token: &str) -> String {
        format!("{principal} sha256:{}", hex::encode(Sha256::digest(token)))
    }

    /// The principal `token` belongs to.
    pub fn principal(&self, token: &str) -> Option<&str> {
        if token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let h: [u8; 32] = Sha256::digest(token).into();
        self.by_hash.get(&h).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// How callers are authenticated.
#[derive(Debug, Default, Clone)]
pub struct Authn {
    /// Client certificates of the cluster CA are checked (the master serves TLS).
    pub certificates: bool,
    pub tokens: Tokens,
}

impl Authn {
    /// Whether calls need a principal.
    pub fn enabled(&self) -> bool {
        self.certificates || !self.tokens.is_empty()
    }

    /// The principal of a call: a bearer token's (a bad token is refused, even with a
    /// certificate), else a client certificate's; `None` when neither is given.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` for a token that is not listed; `PERMISSION_DENIED` for a master's
    /// or an agent's certificate (they are not frameworks or operators).
    pub fn principal(
        &self,
        authorization: Option<&str>,
        certificate: Option<tls::Principal>,
    ) -> Result<Option<String>, Status> {
        if let Some(value) = authorization {
            let (named, token) = if let Some(t) = value.strip_prefix("Bearer ") {
                (None, t.trim().to_owned())
            } else if let Some(b) = value.strip_prefix("Basic ") {
                let (name, token) = basic(b.trim())?;
                (Some(name), token)
            } else {
                return Err(Status::unauthenticated(
                    "the authorization is neither `Bearer TOKEN` nor `Basic` credentials",
                ));
            };
            return match self.tokens.principal(&token) {
                Some(p) if named.as_deref().is_none_or(|n| n == p) => Ok(Some(p.to_owned())),
                _ => Err(Status::unauthenticated("the token is not valid")),
            };
        }
        match certificate {
            Some(p) if p.kind == Kind::Client => Ok(Some(p.name)),
            Some(p) => Err(Status::permission_denied(format!(
                "this certificate is of {p}; frameworks and operators use client certificates"
            ))),
            None => Ok(None),
        }
    }

    /// The principal of `request`, required when authentication is on.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` when a principal is needed and none is given, or as
    /// [`Authn::principal`].
    pub fn check<T>(&self, request: &tonic::Request<T>) -> Result<Option<Caller>, Status> {
        if !self.enabled() {
            return Ok(None);
        }
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default());
        match self.principal(authorization, tls::principal(request))? {
            Some(p) => Ok(Some(Caller(p))),
            None => Err(unauthenticated()),
        }
    }
}

/// Authentication of the HTTP blob store: an upload needs a framework's or an operator's
/// principal; a read also takes an agent's or a master's certificate (agents fetch blobs
/// for their tasks, masters from each other). 401 or 403 otherwise.
///
/// Uploads carry their [`Caller`] on to the store (which bounds each principal's bytes), and
/// every request counts against its caller's rate (429 past it).
pub async fn blobs(
    axum::extract::State((authn, acls, guard)): axum::extract::State<BlobGate>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{Method, StatusCode};
    use axum::response::IntoResponse;
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    let peer = agora_proto::listen::remote_addr(request.extensions());
    let too_fast =
        |s: Status| (StatusCode::TOO_MANY_REQUESTS, format!("{}\n", s.message())).into_response();
    if !authn.enabled() {
        if let Err(s) = guard.call(&crate::limits::caller(None, peer)) {
            return too_fast(s);
        }
        return match crate::acl::check(acls.as_deref(), None, blob_action(read), "*") {
            Ok(()) => next.run(request).await,
            Err(why) => (StatusCode::FORBIDDEN, format!("{why}\n")).into_response(),
        };
    }
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default());
    let certificate = tls::principal_in(request.extensions());
    let server = certificate
        .as_ref()
        .is_some_and(|p| matches!(p.kind, Kind::Agent | Kind::Master));
    let mut caller = None;
    let refused = match authn.principal(authorization, certificate) {
        Ok(Some(p)) => {
            let refused = crate::acl::check(acls.as_deref(), Some(&p), blob_action(read), "*")
                .err()
                .map(Status::permission_denied);
            caller = Some(p);
            refused
        }
        Ok(None) => Some(unauthenticated()),
        // Agents fetch their tasks' blobs: no ACL stands between them.
        Err(_) if read && server && authorization.is_none() => None,
        Err(s) => Some(s),
    };
    if refused.is_none()
        && let Err(s) = guard.call(&crate::limits::caller(caller.as_deref(), peer))
    {
        return too_fast(s);
    }
    match refused {
        None => {
            if let Some(p) = caller {
                request.extensions_mut().insert(Caller(p));
            }
            next.run(request).await
        }
        Some(s) => {
            let code = if s.code() == tonic::Code::PermissionDenied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            let mut r = (code, format!("{}\n", s.message())).into_response();
            if code == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Basic realm=\"agora\""),
                );
            }
            r
        }
    }
}

/// What the blob store's middleware checks with: authentication, ACLs, the callers' rates.
pub type BlobGate = (
    Arc<Authn>,
    Option<Arc<crate::acl::Acls>>,
    Arc<crate::limits::Guard>,
);

fn blob_action(read: bool) -> crate::acl::Action {
    if read {
        crate::acl::Action::ReadBlob
    } else {
        crate::acl::Action::UploadBlob
    }
}

/// What a caller without a principal is told.
pub fn unauthenticated() -> Status {
    Status::unauthenticated(
        "this master authenticates its callers: present a client certificate of the cluster CA (AGORA_CERT, AGORA_KEY) or a token (AGORA_TOKEN)",
    )
}

/// The principal and token of HTTP Basic credentials (`base64(PRINCIPAL:TOKEN)`).
fn basic(b64: &str) -> Result<(String, String), Status> {
    let bad = || Status::unauthenticated("the Basic credentials do not decode");
    use base64::Engine;
    if b64.len() > 4 * MAX_TOKEN_BYTES {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (name, token) = text.split_once(':').ok_or_else(bad)?;
    Ok((name.to_owned(), token.to_owned()))
}

/// A tonic interceptor: refuses calls without a principal when authentication is on, and
/// puts the [`Caller`] in the request's extensions.
/// Then counts the call against its caller's rate ([`crate::limits`]).
#[derive(Clone)]
pub struct Authenticate(pub Arc<Authn>, pub Arc<crate::limits::Guard>);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(caller) = self.0.check(&request)? {
            request.extensions_mut().insert(caller);
        }
        self.1.call(&crate::limits::caller_of(&request))?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_hashed_and_checked() {
        let tokens =
            Tokens::parse(&format!("# ops\n{}\n\n", Tokens::line("ops", "s3cret"))).unwrap();
        assert!(!format!("{tokens:?}").contains("s3cret"));
        let authn = Authn {
            certificates: false,
            tokens,
        };
        assert!(authn.enabled());
        assert_eq!(
            authn.principal(Some("Bearer s3cret"), None).unwrap(),
            Some("ops".into())
        );
        // Basic credentials name the token's principal: b3BzOnMzY3JldA== is "ops:s3cret",
        // YWRtaW46czNjcmV0 "admin:s3cret".
        assert_eq!(
            authn
                .principal(Some("Basic b3BzOnMzY3JldA=="), None)
                .unwrap(),
            Some("ops".into())
        );
        let other = authn
            .principal(Some("Basic YWRtaW46czNjcmV0"), None)
            .unwrap_err();
        assert_eq!(other.code(), tonic::Code::Unauthenticated);
        let wrong = authn.principal(Some("Bearer guess"), None).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert_eq!(authn.principal(None, None).unwrap(), None);
        let agent = tls::Principal {
            name: "a1".into(),
            kind: Kind::Agent,
        };
        let denied = authn.principal(None, Some(agent)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_bad_tokens_file_names_its_line() {
        let e = Tokens::parse("ops sha256:abc").unwrap_err();
        assert!(e.starts_with("line 1"), "{e}");
        let e = Tokens::parse("ops s3cret").unwrap_err();
        assert!(e.contains("sha256"), "{e}");
        let twice = format!("{}\n{}", Tokens::line("a", "t"), Tokens::line("b", "t"));
        assert!(Tokens::parse(&twice).unwrap_err().contains("twice"));
    }
}
