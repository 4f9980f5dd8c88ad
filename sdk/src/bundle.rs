//! Task bundles: a directory (or one `.agora.tgz` archive of it) holding a manifest,
//! `agora.toml`, and what the task needs — its Wasm module or its command, and data files.
//!
//! ```toml
//! name = "wordcount-map"
//! kind = "wasm"                      # or "native"
//! module = "wordcount_map.wasm"      # wasm: the module or component, in the bundle
//! # command = "./run.sh"             # native: a shell command, run in the sandbox
//! args = []
//! input = "input.txt"                # wasm: a file whose bytes go to an agora:task's run
//! files = ["data/", "words.txt"]     # unpacked into the sandbox before the task starts
//! timeout = "30s"
//! fuel = 100000000
//!
//! [resources]
//! cpus = 0.5
//! mem = 64                           # MiB
//!
//! [env]
//! MODE = "upper"
//!
//! [capabilities]                     # wasm; everything not granted is denied
//! sandbox = true
//! wall_clock = true
//! random = true
//! host_env = ["LANG"]
//! connect = ["10.0.0.0/8:443"]
//! volumes = [{ name = "datasets", path = "/data", read_only = true }]
//! ```
//!
//! [`Bundle::open`] reads and checks a bundle — every error names the field and the reason,
//! before anything leaves the machine; [`Bundle::archive`] packs it into one file;
//! [`Bundle::upload`] puts its module and files into the master's blob store and
//! [`Uploaded::task`] makes the task that runs them.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use agora_core::{Resource, Resources, TaskId};
use agora_proto::v1;
use serde::Deserialize;

use crate::{Error, TaskBuilder};

/// The manifest's file name.
pub const MANIFEST: &str = "agora.toml";

/// What `agora.toml` says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub kind: Kind,
    /// Wasm: the module or component, a path inside the bundle.
    pub module: Option<String>,
    /// Native: the shell command.
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// Wasm: a file inside the bundle whose bytes are the input of an agora:task's `run`.
    pub input: Option<String>,
    /// Files and directories inside the bundle to unpack into the sandbox.
    #[serde(default)]
    pub files: Vec<String>,
    /// Wall-clock limit, e.g. `30s`, `2m`.
    pub timeout: Option<String>,
    /// Wasm: a deterministic instruction budget.
    pub fuel: Option<u64>,
    pub resources: ManifestResources,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub capabilities: ManifestCapabilities,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Wasm,
    Native,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestResources {
    #[serde(default)]
    pub cpus: f64,
    /// MiB.
    #[serde(default)]
    pub mem: f64,
    /// MiB.
    #[serde(default)]
    pub disk: f64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestCapabilities {
    #[serde(default)]
    pub sandbox: bool,
    #[serde(default)]
    pub wall_clock: bool,
    #[serde(default)]
    pub random: bool,
    #[serde(default)]
    pub host_env: Vec<String>,
    #[serde(default)]
    pub connect: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<ManifestVolume>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestVolume {
    pub name: String,
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A manifest that is wrong, with the field and why.
fn field(name: &str, why: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{MANIFEST}: `{name}`: {why}"))
}

/// A path inside the bundle: relative, no `..`.
fn inside(dir: &Path, name: &str, rel: &str) -> Result<PathBuf, Error> {
    let p = Path::new(rel);
    if rel.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(field(
            name,
            format!("{rel:?} must be a relative path inside the bundle"),
        ));
    }
    let full = dir.join(p);
    if !full.exists() {
        return Err(field(name, format!("{rel:?} is not in the bundle")));
    }
    // Through a symlink it could name any file of this machine (and upload it).
    let (real, root) = (full.canonicalize(), dir.canonicalize());
    if !matches!((&real, &root), (Ok(r), Ok(d)) if r.starts_with(d)) {
        return Err(field(
            name,
            format!("{rel:?} leads outside the bundle (through a symlink)"),
        ));
    }
    Ok(full)
}

/// `30s`, `250ms`, `2m`, `1h`, or seconds.
fn duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let v: f64 = s[..split].trim().parse().ok()?;
    let k = match &s[split..] {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(v * k).filter(|v| v.is_finite() && *v > 0.0)
}

impl Manifest {
    /// Parses and checks a manifest against the bundle directory it came from.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the field and the reason.
    pub fn parse(text: &str, dir: &Path) -> Result<Manifest, Error> {
        let m: Manifest = toml::from_str(text)
            .map_err(|e| Error::Invalid(format!("{MANIFEST}: {}", e.to_string().trim())))?;
        m.check(dir)?;
        Ok(m)
    }

    fn check(&self, dir: &Path) -> Result<(), Error> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(field(
                "name",
                "must be letters, digits, '-', '_' or '.', and not empty",
            ));
        }
        let r = &self.resources;
        for (n, v) in [("cpus", r.cpus), ("mem", r.mem), ("disk", r.disk)] {
            if !v.is_finite() || v < 0.0 {
                return Err(field(
                    &format!("resources.{n}"),
                    format!("{v} is not a non-negative number"),
                ));
            }
        }
        if r.cpus <= 0.0 && r.mem <= 0.0 {
            return Err(field("resources", "a task needs some cpus or mem"));
        }
        if let Some(t) = &self.timeout
            && duration(t).is_none()
        {
            return Err(field(
                "timeout",
                format!("{t:?} is not a duration like 30s, 500ms or 2m"),
            ));
        }
        for f in &self.files {
            inside(dir, "files", f)?;
        }
        match self.kind {
            Kind::Wasm => {
                let Some(module) = &self.module else {
                    return Err(field("module", "a wasm bundle names its module"));
                };
                let path = inside(dir, "module", module)?;
                let mut head = [0u8; 4];
                let is_wasm = std::fs::File::open(&path)
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                    .is_ok()
                    && &head == b"\0asm";
                if !is_wasm {
                    return Err(field(
                        "module",
                        format!("{module:?} is not a WebAssembly module or component"),
                    ));
                }
                if r.mem <= 0.0 {
                    return Err(field(
                        "resources.mem",
                        "a wasm task needs memory: it is the ceiling on its linear memory",
                    ));
                }
                if self.command.is_some() {
                    return Err(field("command", "only native bundles have a command"));
                }
                if let Some(i) = &self.input {
                    inside(dir, "input", i)?;
                }
                for c in &self.capabilities.connect {
                    check_pattern(c)?;
                }
                for v in &self.capabilities.volumes {
                    if !v.path.starts_with('/') || v.path == "/" {
                        return Err(field(
                            "capabilities.volumes",
                            format!(
                                "volume {:?}: path {:?} must be absolute and not /",
                                v.name, v.path
                            ),
                        ));
                    }
                }
            }
            Kind::Native => {
                if self.command.as_deref().is_none_or(|c| c.trim().is_empty()) {
                    return Err(field("command", "a native bundle has a command"));
                }
                for (n, set) in [
                    ("module", self.module.is_some()),
                    ("input", self.input.is_some()),
                    ("fuel", self.fuel.is_some()),
                    (
                        "capabilities",
                        self.capabilities != ManifestCapabilities::default(),
                    ),
                ] {
                    if set {
                        return Err(field(n, "only wasm bundles have one"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The task's resources.
    ///
    /// # Errors
    /// When a value is out of range (checked already by [`Manifest::parse`]).
    pub fn resources(&self) -> Result<Resources, Error> {
        let r = &self.resources;
        [("cpus", r.cpus), ("mem", r.mem), ("disk", r.disk)]
            .into_iter()
            .filter(|(_, v)| *v > 0.0)
            .map(|(n, v)| Resource::scalar(n, v).map_err(|e| field(&format!("resources.{n}"), e)))
            .collect()
    }
}

fn check_pattern(p: &str) -> Result<(), Error> {
    let ok = match p.rsplit_once(':') {
        Some((host, port)) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let host_ok = host == "*"
                || host == "localhost"
                || host
                    .split_once('/')
                    .map_or(host, |(a, _)| a)
                    .parse::<std::net::IpAddr>()
                    .is_ok();
            let port_ok = port == "*" || port.split('-').all(|n| n.parse::<u16>().is_ok());
            host_ok && port_ok
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(field(
            "capabilities.connect",
            format!(
                "{p:?} is not HOST:PORT (an IP, a CIDR block, localhost or *; a port, a range or *)"
            ),
        ))
    }
}

/// A bundle on disk, checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Holds the unpacked archive for as long as the bundle lives.
    _unpacked: Option<std::sync::Arc<TempDir>>,
}

/// A directory removed when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Invalid(format!("{what} {}: {e}", path.display()))
}

impl Bundle {
    /// Reads a bundle: a directory with an `agora.toml`, or an archive made by
    /// [`Bundle::archive`].
    ///
    /// # Errors
    /// [`Error::Invalid`] when it cannot be read or its manifest is wrong (naming the
    /// field and the reason).
    pub fn open(path: &Path) -> Result<Bundle, Error> {
        if path.is_dir() {
            let manifest_path = path.join(MANIFEST);
            let text = std::fs::read_to_string(&manifest_path)
                .map_err(|e| io("reading", &manifest_path, e))?;
            return Ok(Bundle {
                manifest: Manifest::parse(&text, path)?,
                dir: path.to_owned(),
                _unpacked: None,
            });
        }
        let tmp = std::env::temp_dir().join(format!(
            "agora-bundle-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&tmp).map_err(|e| io("creating", &tmp, e))?;
        let guard = std::sync::Arc::new(TempDir(tmp.clone()));
        let file = std::fs::File::open(path).map_err(|e| io("reading", path, e))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in archive
            .entries()
            .map_err(|e| io("reading the bundle", path, e))?
        {
            let mut entry = entry.map_err(|e| io("reading the bundle", path, e))?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                return Err(Error::Invalid(format!(
                    "bundle {}: holds something other than files and directories",
                    path.display()
                )));
            }
            if !entry
                .unpack_in(&tmp)
                .map_err(|e| io("unpacking the bundle", path, e))?
            {
                return Err(Error::Invalid(format!(
                    "bundle {}: an entry leaves the bundle",
                    path.display()
                )));
            }
        }
        let mut b = Bundle::open(&tmp)?;
        b._unpacked = Some(guard);
        Ok(b)
    }

    /// Packs the bundle — manifest, module, input and files — into one `.tar.gz`.
    ///
    /// # Errors
    /// When a file cannot be read or the archive written.
    pub fn archive(&self, to: &Path) -> Result<(), Error> {
        let file = std::fs::File::create(to).map_err(|e| io("creating", to, e))?;
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::default(),
        ));
        tar.follow_symlinks(false);
        let m = &self.manifest;
        let mut paths = vec![MANIFEST.to_owned()];
        paths.extend(m.module.clone());
        paths.extend(m.input.clone());
        paths.extend(m.files.iter().cloned());
        for rel in paths {
            let full = self.dir.join(&rel);
            let r = if full.is_dir() {
                tar.append_dir_all(&rel, &full)
            } else {
                tar.append_path_with_name(&full, &rel)
            };
            r.map_err(|e| io("packing", &full, e))?;
        }
        tar.into_inner()
            .and_then(|gz| gz.finish())
            .map_err(|e| io("writing", to, e))?;
        Ok(())
    }

    /// Packs the bundle's `files` into a `.tar.gz` in `into` (none if it has no files).
    ///
    /// # Errors
    /// When a file cannot be read or the archive written.
    pub fn files_archive(&self, into: &Path) -> Result<Option<PathBuf>, Error> {
        if self.manifest.files.is_empty() {
            return Ok(None);
        }
        let to = into.join(format!("{}-files.tar.gz", self.manifest.name));
        let file = std::fs::File::create(&to).map_err(|e| io("creating", &to, e))?;
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::default(),
        ));
        tar.follow_symlinks(false);
        for rel in &self.manifest.files {
            let full = self.dir.join(rel);
            let r = if full.is_dir() {
                tar.append_dir_all(rel, &full)
            } else {
                tar.append_path_with_name(&full, rel)
            };
            r.map_err(|e| io("packing", &full, e))?;
        }
        tar.into_inner()
            .and_then(|gz| gz.finish())
            .map_err(|e| io("writing", &to, e))?;
        Ok(Some(to))
    }

    /// Uploads the module and the files to the master's blob store.
    ///
    /// # Errors
    /// As [`crate::blob::upload_file`].
    pub async fn upload(
        &self,
        master: &str,
        progress: impl Fn(&str, u64, u64) + Clone + Send + Sync + 'static,
    ) -> Result<Uploaded, Error> {
        let m = &self.manifest;
        let module = match &m.module {
            Some(rel) => {
                let p = progress.clone();
                let name = rel.clone();
                Some(
                    crate::blob::upload_file(master, &self.dir.join(rel), move |s, t| {
                        p(&name, s, t);
                    })
                    .await?,
                )
            }
            None => None,
        };
        let tmp = std::env::temp_dir().join(format!(
            "agora-upload-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&tmp).map_err(|e| io("creating", &tmp, e))?;
        let _guard = TempDir(tmp.clone());
        let files = match self.files_archive(&tmp)? {
            Some(archive) => {
                let p = progress.clone();
                Some(
                    crate::blob::upload_file(master, &archive, move |s, t| p("files", s, t))
                        .await?,
                )
            }
            None => None,
        };
        let input = match &m.input {
            Some(rel) => {
                let p = self.dir.join(rel);
                Some(std::fs::read(&p).map_err(|e| io("reading", &p, e))?)
            }
            None => None,
        };
        Ok(Uploaded {
            manifest: m.clone(),
            module,
            files,
            input,
        })
    }
}

/// A bundle whose module and files are in the master's blob store.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub manifest: Manifest,
    /// `sha256:<hex>` of the module.
    pub module: Option<String>,
    /// `sha256:<hex>` of the files' archive.
    pub files: Option<String>,
    pub input: Option<Vec<u8>>,
}

impl Uploaded {
    /// The task that runs the bundle.
    ///
    /// # Errors
    /// When the manifest's resources are out of range.
    pub fn task(&self, task_id: TaskId) -> Result<TaskBuilder, Error> {
        let m = &self.manifest;
        let mut b = match (m.kind, &self.module, &m.command) {
            (Kind::Wasm, Some(digest), _) => {
                TaskBuilder::wasm_uri(task_id, digest.clone(), Some(digest.clone()))
            }
            (Kind::Native, _, Some(cmd)) => TaskBuilder::command(task_id, cmd.clone()),
            _ => return Err(Error::Invalid("the bundle was not uploaded whole".into())),
        };
        b = b
            .name(&m.name)
            .resources(m.resources()?)
            .args(m.args.clone());
        for (k, v) in &m.env {
            b = b.env(k, v);
        }
        if let Some(f) = m.fuel {
            b = b.fuel(f);
        }
        if let Some(t) = m.timeout.as_deref().and_then(duration) {
            b = b.max_duration(t);
        }
        if let Some(input) = &self.input {
            b = b.input(input.clone());
        }
        if let Some(files) = &self.files {
            b = b.uri(v1::Uri {
                value: files.clone(),
                extract: true,
                cache: true,
                output_file: "bundle-files.tar.gz".into(),
                ..Default::default()
            });
        }
        let c = &m.capabilities;
        if m.kind == Kind::Wasm {
            if c.sandbox {
                b = b.grant_sandbox();
            }
            if c.wall_clock {
                b = b.grant_wall_clock();
            }
            if c.random {
                b = b.grant_random();
            }
            for e in &c.host_env {
                b = b.grant_host_env(e);
            }
            for p in &c.connect {
                b = b.grant_connect(p);
            }
            for v in &c.volumes {
                b = b.grant_volume(&v.name, &v.path, v.read_only);
            }
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, data) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        d
    }

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn a_good_manifest_parses() {
        let d = dir_with(&[("m.wasm", WASM), ("in.txt", b"x"), ("data/a", b"1")]);
        let m = Manifest::parse(
            r#"
            name = "t1"
            kind = "wasm"
            module = "m.wasm"
            input = "in.txt"
            files = ["data/"]
            timeout = "2m"
            [resources]
            cpus = 0.5
            mem = 32
            [env]
            MODE = "upper"
            [capabilities]
            sandbox = true
            connect = ["127.0.0.1:80", "[::1]:1-2"]
            volumes = [{ name = "v", path = "/data", read_only = true }]
            "#,
            d.path(),
        )
        .unwrap();
        assert_eq!(m.resources().unwrap().to_string(), "cpus:0.5;mem:32");
        assert_eq!(duration("2m"), Some(120.0));
    }

    #[test]
    fn bad_manifests_name_the_field_and_the_reason() {
        let d = dir_with(&[("m.wasm", WASM), ("not.wasm", b"#!/bin/sh")]);
        let base = "name = \"t\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\n[resources]\nmem = 32\n";
        let cases = [
            (
                "name = \"t\"\nkind = \"wasm\"\n[resources]\nmem = 32\n",
                "`module`: a wasm bundle names its module",
            ),
            (
                "name = \"t\"\nkind = \"wasm\"\nmodule = \"gone.wasm\"\n[resources]\nmem = 32\n",
                "\"gone.wasm\" is not in the bundle",
            ),
            (
                "name = \"t\"\nkind = \"wasm\"\nmodule = \"not.wasm\"\n[resources]\nmem = 32\n",
                "is not a WebAssembly module",
            ),
            (
                "name = \"t\"\nkind = \"wasm\"\nmodule = \"../m.wasm\"\n[resources]\nmem = 32\n",
                "relative path inside the bundle",
            ),
            (
                "name = \"t\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\n[resources]\ncpus = 1\n",
                "`resources.mem`",
            ),
            (
                "name = \"t\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\n[resources]\nmem = -1\n",
                "`resources.mem`: -1",
            ),
            (
                "name = \"t t\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\n[resources]\nmem = 1\n",
                "`name`",
            ),
            (
                "name = \"t\"\nkind = \"java\"\n[resources]\nmem = 1\n",
                "unknown variant `java`",
            ),
            (
                "name = \"t\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\ncolour = 1\n[resources]\nmem = 1\n",
                "unknown field `colour`",
            ),
            (
                "name = \"t\"\nkind = \"native\"\n[resources]\nmem = 1\n",
                "`command`: a native bundle has a command",
            ),
            (
                "name = \"t\"\nkind = \"native\"\ncommand = \"true\"\nfuel = 5\n[resources]\nmem = 1\n",
                "`fuel`: only wasm bundles",
            ),
        ];
        for (text, says) in cases {
            let e = Manifest::parse(text, d.path()).unwrap_err().to_string();
            assert!(e.contains(says), "{says:?} not in {e:?}");
        }
        let with = |extra: &str| format!("{base}{extra}");
        let e = Manifest::parse(
            &with("[capabilities]\nconnect = [\"example.com:80\"]\n"),
            d.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`capabilities.connect`"), "{e}");
        let e = Manifest::parse(&format!("timeout = \"soon\"\n{base}"), d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`timeout`"), "{e}");
        // A file of the bundle that is a link to one outside it is refused.
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(secret.path(), d.path().join("input.txt")).unwrap();
        let e = Manifest::parse(&format!("input = \"input.txt\"\n{base}"), d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("leads outside the bundle"), "{e}");
    }

    #[test]
    fn a_bundle_round_trips_through_its_archive() {
        let d = dir_with(&[
            ("m.wasm", WASM),
            ("data/a.txt", b"alpha"),
            (
                MANIFEST,
                b"name = \"rt\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\nfiles = [\"data\"]\n[resources]\nmem = 16\n",
            ),
        ]);
        let b = Bundle::open(d.path()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let archive = out.path().join("rt.agora.tgz");
        b.archive(&archive).unwrap();
        let again = Bundle::open(&archive).unwrap();
        assert_eq!(again.manifest, b.manifest);
        assert_eq!(
            std::fs::read(again.dir.join("data/a.txt")).unwrap(),
            b"alpha"
        );
        let unpacked = again.dir.clone();
        drop(again);
        assert!(!unpacked.exists(), "the unpacked copy goes with the bundle");
    }
}
