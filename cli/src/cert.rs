//! `agora cert`: a cluster's CA and the certificates it issues to masters, agents and
//! clients (see [`agora_proto::tls`] for what a certificate says).
//!
//! ```text
//! agora cert init  [--dir DIR]                                  DIR/ca.pem, DIR/ca.key
//! agora cert issue master|agent|client NAME [--host H]... [--days N] [--dir DIR]
//!                                                               DIR/KIND-NAME.pem, .key
//! ```
//!
//! Keys are written 0600 and never overwritten: a name that was issued before is refused.

use std::io::Write;
use std::path::{Path, PathBuf};

use agora_proto::tls::Kind;
use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Subcommand)]
pub enum CertAction {
    /// Make the cluster's CA: DIR/ca.pem (give it to every process) and DIR/ca.key (keep it
    /// where only `agora cert issue` reads it).
    Init {
        #[command(flatten)]
        dir: CertDir,
        /// Years the CA is valid for.
        #[arg(long, default_value_t = 10)]
        years: u32,
    },
    /// Issue a certificate signed by the CA: DIR/KIND-NAME.pem and DIR/KIND-NAME.key. NAME
    /// is the principal; masters and agents present the same certificate when they serve and
    /// when they call.
    Issue {
        kind: CertKind,
        name: String,
        /// Host names and IP addresses it is served on (masters and agents). Default: NAME
        /// if it is a host name, localhost and 127.0.0.1.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days it is valid for (0 issues one that has already expired, for testing refusals).
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[command(flatten)]
        dir: CertDir,
    },
}

#[derive(Subcommand)]
pub enum TokenAction {
    /// Make a token for PRINCIPAL: prints it (the only time it is shown) and adds its hash
    /// to FILE, the master's `--tokens` file. Callers give it as AGORA_TOKEN.
    Create {
        principal: String,
        #[arg(long, default_value = "agora-tokens")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum AclAction {
    /// Say whether PRINCIPAL may do ACTION to OBJECT under the ACL file, and which rule
    /// decides ("-" as the principal: an unauthenticated caller). Exits 1 when denied.
    Check {
        principal: String,
        action: String,
        object: String,
        #[arg(long)]
        acls: PathBuf,
    },
}

pub fn acl(action: AclAction) -> anyhow::Result<()> {
    use agora_master::acl::{Acls, Action};
    let AclAction::Check {
        principal,
        action,
        object,
        acls,
    } = action;
    let acls = Acls::load(&acls).map_err(anyhow::Error::msg)?;
    let Some(action) = Action::parse(&action) else {
        let all: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
        bail!("no action {action:?}; the actions are {}", all.join(", "));
    };
    let principal = (principal != "-").then_some(principal);
    let d = acls.decide(principal.as_deref(), action, &object);
    println!("{}", d.explain(principal.as_deref(), action, &object));
    if !d.allowed {
        std::process::exit(1);
    }
    Ok(())
}

pub fn token(action: TokenAction) -> anyhow::Result<()> {
    let TokenAction::Create { principal, file } = action;
    check_name(&principal)?;
    let token = format!(
        "agt_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let line = agora_master::auth::Tokens::line(&principal, &token);
    // The file must still parse with the new line: no principal gets two tokens that collide.
    let before = std::fs::read_to_string(&file).unwrap_or_default();
    agora_master::auth::Tokens::parse(&format!("{before}\n{line}\n"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("opening {}", file.display()))?;
    writeln!(f, "{line}")
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", file.display()))?;
    println!("{token}");
    Ok(())
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!(
            "{name:?} is not a principal's name: 1 to {MAX_NAME} letters, digits, '-', '_' or '.'"
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct CertDir {
    /// Where the CA and the certificates are.
    #[arg(long, env = "AGORA_CERT_DIR", default_value = "agora-certs")]
    dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CertKind {
    Master,
    Agent,
    Client,
}

impl From<CertKind> for Kind {
    fn from(k: CertKind) -> Kind {
        match k {
            CertKind::Master => Kind::Master,
            CertKind::Agent => Kind::Agent,
            CertKind::Client => Kind::Client,
        }
    }
}

/// The longest principal name: it travels in every call's identity.
const MAX_NAME: usize = 64;

pub fn cert(action: CertAction) -> anyhow::Result<()> {
    match action {
        CertAction::Init { dir, years } => {
            let (cert, key) = init(&dir.dir, years)?;
            println!("{}\n{}", cert.display(), key.display());
        }
        CertAction::Issue {
            kind,
            name,
            hosts,
            days,
            dir,
        } => {
            let (cert, key) = issue(&dir.dir, kind.into(), &name, &hosts, days)?;
            println!("{}\n{}", cert.display(), key.display());
        }
    }
    Ok(())
}

/// Writes `contents` to a new file `path` (never over an existing one), `mode` from the
/// start.
fn create(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn refuse_existing(paths: &[&Path]) -> anyhow::Result<()> {
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        bail!("{} exists already; nothing was written", p.display());
    }
    Ok(())
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Makes the CA in `dir`; returns the certificate's and the key's paths.
///
/// # Errors
/// When a CA is already there, or the files cannot be written.
pub fn init(dir: &Path, years: u32) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    refuse_existing(&[&cert_path, &key_path])?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut params = CertificateParams::new(Vec::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "Agora cluster CA");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now() - time::Duration::minutes(5);
    params.not_after = now() + time::Duration::days(365 * i64::from(years.max(1)));
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    create(&key_path, &key.serialize_pem(), 0o600)?;
    create(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Issues a `kind` certificate for principal `name`, signed by the CA in `dir`; returns the
/// certificate's and the key's paths.
///
/// # Errors
/// When the name is not a principal's, the CA cannot be read, the name was issued before,
/// or the files cannot be written.
pub fn issue(
    dir: &Path,
    kind: Kind,
    name: &str,
    hosts: &[String],
    days: u32,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    check_name(name)?;
    let stem = format!("{}-{name}", kind.name());
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    refuse_existing(&[&cert_path, &key_path])?;
    let ca_cert = std::fs::read_to_string(dir.join("ca.pem")).with_context(|| {
        format!(
            "reading the CA in {} (run `agora cert init`)",
            dir.display()
        )
    })?;
    let ca_key = std::fs::read_to_string(dir.join("ca.key"))
        .with_context(|| format!("reading the CA's key in {}", dir.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key).context("the CA's key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).context("the CA's certificate")?;

    let hosts: Vec<String> = if hosts.is_empty() && kind != Kind::Client {
        let mut h = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if name.parse::<std::net::IpAddr>().is_err() && !h.iter().any(|x| x == name) {
            h.insert(0, name.to_owned());
        }
        h
    } else {
        hosts.to_vec()
    };
    let mut params = CertificateParams::new(Vec::new())?;
    for h in &hosts {
        params
            .subject_alt_names
            .push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    h.clone()
                        .try_into()
                        .with_context(|| format!("{h:?} is not a host name"))?,
                ),
            });
    }
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, kind.unit());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now() - time::Duration::minutes(5);
    params.not_after = if days == 0 {
        now() - time::Duration::minutes(1)
    } else {
        now() + time::Duration::days(i64::from(days))
    };
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    create(&key_path, &key.serialize_pem(), 0o600)?;
    create(&cert_path, &cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issued_certificate_names_its_principal_and_nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 1).unwrap();
        assert!(init(dir.path(), 1).is_err(), "a second CA over the first");
        let (cert, key) = issue(dir.path(), Kind::Agent, "node-7", &[], 30).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&cert).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let p = agora_proto::tls::principal_of(&der.contents).unwrap();
        assert_eq!((p.name.as_str(), p.kind), ("node-7", Kind::Agent));
        let again = issue(dir.path(), Kind::Agent, "node-7", &[], 30).unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        let bad = issue(dir.path(), Kind::Client, "a b", &[], 30).unwrap_err();
        assert!(bad.to_string().contains("not a principal"), "{bad}");
    }
}
