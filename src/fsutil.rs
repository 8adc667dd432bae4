//! File-system helpers with the durability and safety rules every writer in
//! beamup follows: outputs appear whole or not at all, existing files are
//! never clobbered unless the caller says so, and secrets are created with
//! restrictive permissions from the first byte (no chmod after the fact).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// Writes `path` atomically: a temporary file in the same directory is
/// written, fsynced, renamed over `path`, and the directory is fsynced, so a
/// power cut leaves either the old content or the new one.
///
/// With `overwrite == false` an existing `path` is an [`Error::Exists`]; the
/// check and the rename are not one atomic step, which is fine for the CLI's
/// single-writer use.
pub(crate) fn write_atomic(path: &Path, mode: u32, overwrite: bool, bytes: &[u8]) -> Result<()> {
    let mut out = AtomicFile::create(path, mode, overwrite)?;
    out.write_all(bytes).ctx(out.tmp_path(), "write")?;
    out.commit()
}

/// A file being written under a temporary name beside its final path. Dropped
/// without [`AtomicFile::commit`], the temporary file is removed: a failed
/// command leaves nothing behind.
pub(crate) struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
}

impl AtomicFile {
    pub(crate) fn create(dest: &Path, mode: u32, overwrite: bool) -> Result<Self> {
        if !overwrite && dest.symlink_metadata().is_ok() {
            return Err(Error::Exists {
                path: dest.to_path_buf(),
            });
        }
        let dir = parent_dir(dest);
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Usage(format!("{}: not a file path", dest.display())))?;
        let mut tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut n = 0;
        let file = loop {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => break f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => {
                    n += 1;
                    tmp = dir.join(format!(
                        ".{}.tmp-{}-{n}",
                        name.to_string_lossy(),
                        std::process::id()
                    ));
                }
                Err(e) => return Err(Error::io(&tmp, "create", e)),
            }
        };
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
        })
    }

    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    pub(crate) fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("file present until commit");
        if self.overwrite {
            keep_owner(&file, &self.tmp, &self.dest)?;
        }
        file.sync_all().ctx(&self.tmp, "fsync")?;
        drop(file);
        if !self.overwrite {
            // Hard-link then unlink: fails if the destination appeared meanwhile.
            fs::hard_link(&self.tmp, &self.dest).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::Exists {
                        path: self.dest.clone(),
                    }
                } else {
                    Error::io(&self.dest, "create", e)
                }
            })?;
            let _ = fs::remove_file(&self.tmp);
        } else {
            fs::rename(&self.tmp, &self.dest).ctx(&self.dest, "rename into place")?;
        }
        sync_dir(parent_dir(&self.dest))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("open").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("open").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A file that replaces another keeps the replaced file's owner and group:
/// beamup running as root must not take `bin/REL` or `start_erl.data` away
/// from the release's user, whose node rewrites them (`make_permanent`).
/// Without the privilege to give a file away (not root, or no `CAP_CHOWN`)
/// the new file stays the writer's, as any file it creates.
fn keep_owner(file: &File, tmp: &Path, dest: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(old) = fs::symlink_metadata(dest) else {
        return Ok(());
    };
    let new = file.metadata().ctx(tmp, "stat")?;
    if (old.uid(), old.gid()) == (new.uid(), new.gid()) {
        return Ok(());
    }
    match std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid())) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        r => r.ctx(tmp, "chown to the replaced file's owner"),
    }
}

/// fsync a directory so that a rename or create inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(dir, "fsync directory")
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Reads a small file whole, refusing anything larger than `limit` before
/// allocating for it: input files are hostile until verified.
pub(crate) fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = File::open(path).ctx(path, "open")?;
    let len = file.metadata().ctx(path, "stat")?.len();
    if len > limit {
        return Err(Error::TooLarge {
            what: format!("{} ({what})", path.display()),
            size: len,
            limit,
        });
    }
    let mut buf = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .ctx(path, "read")?;
    if buf.len() as u64 > limit {
        return Err(Error::TooLarge {
            what: format!("{} ({what})", path.display()),
            size: buf.len() as u64,
            limit,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_replaced_file_keeps_its_owner_when_the_writer_may_give_it_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("start_erl.data");
        fs::write(&path, "13.1.5 1.0.0\n").unwrap();
        let nobody = 65534;
        let privileged = std::os::unix::fs::chown(&path, Some(nobody), Some(nobody)).is_ok();
        write_atomic(&path, 0o644, true, b"13.1.5 1.1.0\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"13.1.5 1.1.0\n");
        let meta = fs::metadata(&path).unwrap();
        if privileged {
            assert_eq!((meta.uid(), meta.gid()), (nobody, nobody));
        } else {
            // Unprivileged: the writer's own file, and no error.
            assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        }
    }
}
