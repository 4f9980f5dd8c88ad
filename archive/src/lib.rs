//! Unpacks the archives a task fetches (`extract` URIs: tar, tar.gz, zip) into its sandbox.
//!
//! Untrusted bytes come through here, so every entry is judged before it is written: one
//! that climbs out of the sandbox (`..`, an absolute path, a link that goes up, a symlink
//! planted earlier), a device node or FIFO, or more bytes than the task's budget fails the
//! whole extraction with a message naming the entry. Nothing here panics on bad input; the
//! fuzz target `archive` holds it to that. A crate of its own so that target builds without
//! the agent's runtimes.

use std::io::{self, Read};
use std::path::{Component, Path};

/// The archive formats a fetch may unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tar,
    TarGz,
    Zip,
}

impl Kind {
    /// The format a file name says it holds (`.tar`, `.tar.gz`, `.tgz`, `.zip`, any case).
    #[must_use]
    pub fn of(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase();
        if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
            Some(Self::TarGz)
        } else if n.ends_with(".tar") {
            Some(Self::Tar)
        } else if n.ends_with(".zip") {
            Some(Self::Zip)
        } else {
            None
        }
    }
}

/// Unpacks archive bytes held in memory into `dest`: the fuzz target's entry point. A zip
/// is first written beside `dest` (as `dest.zip`), since zip readers need to seek.
///
/// # Errors
/// As [`extract`].
pub fn extract_bytes(kind: Kind, bytes: &[u8], dest: &Path, budget: u64) -> Result<u64, String> {
    std::fs::create_dir_all(dest).map_err(|e| e.to_string())?;
    match kind {
        Kind::Zip => {
            let file = dest.with_extension("zip");
            std::fs::write(&file, bytes).map_err(|e| e.to_string())?;
            let f = std::fs::File::open(&file).map_err(|e| e.to_string())?;
            extract_zip(f, dest, budget)
        }
        Kind::TarGz => extract_tar(flate2::read::GzDecoder::new(bytes), dest, budget),
        Kind::Tar => extract_tar(bytes, dest, budget),
    }
}

/// Unpacks the archive file at `archive` into `dest` (created if missing); returns the
/// bytes written.
///
/// # Errors
/// A message naming the entry and what is wrong with it, or the I/O error.
pub fn extract(kind: Kind, archive: &Path, dest: &Path, budget: u64) -> Result<u64, String> {
    std::fs::create_dir_all(dest).map_err(|e| e.to_string())?;
    let file = std::fs::File::open(archive).map_err(|e| e.to_string())?;
    match kind {
        Kind::Tar => extract_tar(file, dest, budget),
        Kind::TarGz => extract_tar(flate2::read::GzDecoder::new(file), dest, budget),
        Kind::Zip => extract_zip(file, dest, budget),
    }
}

/// Unpacks a tar stream into `dest`, writing at most `budget` bytes.
///
/// # Errors
/// As [`extract`].
pub fn extract_tar(from: impl Read, dest: &Path, budget: u64) -> Result<u64, String> {
    use tar::EntryType;
    let mut archive = tar::Archive::new(from);
    // Mode bits, not setuid/setgid/sticky: files are unpacked by the agent's user (root).
    archive.set_preserve_permissions(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut written = 0u64;
    for entry in archive
        .entries()
        .map_err(|e| format!("reading the archive: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let path = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            EntryType::Regular
                | EntryType::Continuous
                | EntryType::Directory
                | EntryType::Symlink
                | EntryType::Link
                | EntryType::GNULongName
                | EntryType::GNULongLink
                | EntryType::XHeader
                | EntryType::XGlobalHeader
        ) {
            return Err(format!(
                "archive entry {path:?} is a {kind:?}, which a sandbox may not hold"
            ));
        }
        if matches!(kind, EntryType::Symlink | EntryType::Link) {
            // Only links that go down: a target may not be absolute or climb with `..`
            // (judging a climb by the entry's own path is not enough — an earlier link, say
            // `a -> .`, makes the real directory shallower than the path says).
            let target = entry.link_name().ok().flatten();
            if target.as_ref().is_none_or(|t| {
                t.components()
                    .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            }) {
                return Err(format!("archive entry {path:?} links outside the sandbox"));
            }
        }
        written = written.saturating_add(entry.size());
        if written > budget {
            return Err(format!(
                "unpacks to more than the {budget} bytes this task may fetch"
            ));
        }
        match entry.unpack_in(dest) {
            Ok(true) => {}
            Ok(false) => return Err(format!("archive entry {path:?} leaves the sandbox")),
            Err(e) => return Err(format!("unpacking {path:?}: {e}")),
        }
    }
    Ok(written)
}

/// Unpacks a zip file into `dest`, writing at most `budget` bytes.
///
/// # Errors
/// As [`extract`].
pub fn extract_zip(file: std::fs::File, dest: &Path, budget: u64) -> Result<u64, String> {
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("reading the archive: {e}"))?;
    let mut written = 0u64;
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| format!("reading the archive: {e}"))?;
        let name = f
            .name()
            .map(|n| n.into_owned())
            .unwrap_or_else(|_| "?".into());
        let mode = f.unix_mode();
        let Some(rel) = f.enclosed_name() else {
            return Err(format!("archive entry {name:?} leaves the sandbox"));
        };
        if f.is_symlink() {
            return Err(format!(
                "archive entry {name:?} is a symlink, which zip archives may not carry here"
            ));
        }
        let target = dest.join(&rel);
        if f.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| format!("unpacking {name:?}: {e}"))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("unpacking {name:?}: {e}"))?;
        }
        // Refuse to write through a symlink an earlier entry (or the task) put in the way.
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "archive entry {name:?} would write through a symlink"
            ));
        }
        // Opened without following a link, so one planted after the check is refused too.
        let mut out = create_nofollow(&target).map_err(|e| format!("unpacking {name:?}: {e}"))?;
        // The declared size can lie; count what actually comes out.
        let left = budget.saturating_sub(written);
        let n = io::copy(&mut (&mut f).take(left.saturating_add(1)), &mut out)
            .map_err(|e| format!("unpacking {name:?}: {e}"))?;
        written += n;
        if n > left {
            return Err(format!(
                "unpacks to more than the {budget} bytes this task may fetch"
            ));
        }
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            // On the open file, not the path, which a link could have replaced meanwhile.
            let _ = out.set_permissions(std::fs::Permissions::from_mode(mode & 0o777));
        }
    }
    Ok(written)
}

/// Creates (or truncates) `path` without following a symlink planted there: the fetcher
/// writes as the agent's user into directories a task may have shaped.
///
/// # Errors
/// The open's, `ELOOP` when `path` is a symlink.
pub fn create_nofollow(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn names_say_the_format() {
        assert_eq!(Kind::of("a.TAR.GZ"), Some(Kind::TarGz));
        assert_eq!(Kind::of("a.tgz"), Some(Kind::TarGz));
        assert_eq!(Kind::of("a.tar"), Some(Kind::Tar));
        assert_eq!(Kind::of("a.Zip"), Some(Kind::Zip));
        assert_eq!(Kind::of("a.gz"), None);
        assert_eq!(Kind::of("tar"), None);
    }

    #[test]
    fn unpacks_within_the_budget_and_refuses_beyond_it() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = tar_of(&[("d/a", b"0123456789"), ("b", b"xy")]);
        let dest = dir.path().join("ok");
        assert_eq!(extract_bytes(Kind::Tar, &bytes, &dest, 12), Ok(12));
        assert_eq!(std::fs::read(dest.join("d/a")).unwrap(), b"0123456789");
        let err = extract_bytes(Kind::Tar, &bytes, &dir.path().join("over"), 11).unwrap_err();
        assert!(err.contains("more than the 11 bytes"), "{err}");
    }

    #[test]
    fn a_zip_whose_data_outgrows_its_declared_size_is_cut_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut z = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
        z.start_file("big", zip::write::SimpleFileOptions::default())
            .unwrap();
        io::Write::write_all(&mut z, &[7u8; 4096]).unwrap();
        let bytes = z.finish().unwrap().into_inner();
        let dest = dir.path().join("s");
        let err = extract_bytes(Kind::Zip, &bytes, &dest, 100).unwrap_err();
        assert!(err.contains("more than the 100 bytes"), "{err}");
        assert!(std::fs::metadata(dest.join("big")).unwrap().len() <= 101);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = b"\x1f\x8b not an archive ".repeat(64);
        for kind in [Kind::Tar, Kind::TarGz, Kind::Zip] {
            let dest = dir.path().join(format!("{kind:?}"));
            assert!(
                extract_bytes(kind, &garbage, &dest, 1 << 20).is_err(),
                "{kind:?}"
            );
        }
    }
}
