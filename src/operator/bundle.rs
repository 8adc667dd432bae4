//! Making a bundle (`beamup bundle`): the release tarball checked with the
//! rules every device applies, recompressed as one gzip member per unit
//! with its index (`tarindex`), hashed chunk by chunk, the manifest signed,
//! and the two members written as the container `crate::bundle` reads.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::bundle::{
    BLOCK, IO_BUF, MANIFEST_ENTRY, TARBALL_ENTRY, hash_stream, member_header, padding,
};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::release::manifest::{self, Manifest, ReleaseRef, TarballRef};
use crate::release::metadata;
use crate::trust::keys::SecretKey;
use crate::trust::signed::{DocKind, Envelope};

/// How to make a bundle.
#[derive(Clone, Debug)]
pub struct BundleOptions {
    pub chunk_size: u32,
    pub expires_in: Duration,
    pub targets: Vec<String>,
    /// Defaults to [`super::sequence::issue`]: milliseconds since the epoch
    /// times 1024 plus per-machine bits, strictly increasing per user.
    pub sequence: Option<u64>,
    pub allow_downgrade: bool,
    pub now: SystemTime,
    /// Recompress the tarball as one gzip member per unit with an index in
    /// the manifest (see [`super::tarindex`]); `false` keeps its bytes.
    pub indexed: bool,
}

impl Default for BundleOptions {
    fn default() -> Self {
        BundleOptions {
            chunk_size: manifest::DEFAULT_CHUNK_SIZE,
            expires_in: Duration::from_secs(30 * 24 * 3600),
            targets: vec!["any".into()],
            sequence: None,
            allow_downgrade: false,
            now: SystemTime::now(),
            indexed: true,
        }
    }
}

/// Builds and signs a bundle from a release tarball. The output appears only
/// when everything succeeded.
pub fn create(
    release_tar: &Path,
    keys: &[SecretKey],
    opts: &BundleOptions,
    out: &Path,
) -> Result<Manifest> {
    if keys.is_empty() {
        return Err(Error::Usage(
            "at least one signing key (--key) is needed".into(),
        ));
    }
    let info = metadata::inspect(release_tar)?;
    // What every device checks, checked before anything is signed: the
    // tar stream of an indexed tarball is this one's.
    let input = File::open(release_tar).ctx(release_tar, "open")?;
    crate::release::tarrules::check_stream(input).map_err(|detail| Error::UnsafeRelease {
        path: release_tar.to_path_buf(),
        detail,
    })?;
    let mut repacked = None;
    let mut parts = Vec::new();
    let release_tar = if opts.indexed {
        let tmp = Scratch(out.with_file_name(format!(
            ".{}.tarball.tmp",
            out.file_name().map_or("bundle".into(), |n| n.to_string_lossy())
        )));
        let input = File::open(release_tar).ctx(release_tar, "open")?;
        let output = File::create(&tmp.0).ctx(&tmp.0, "create")?;
        parts = super::tarindex::index(input, output, &release_tar.display().to_string())?;
        &repacked.insert(tmp).0
    } else {
        release_tar
    };
    let mut file = File::open(release_tar).ctx(release_tar, "open")?;
    let size = file.metadata().ctx(release_tar, "stat")?.len();
    let digests = hash_stream(&mut file, size, opts.chunk_size).ctx(release_tar, "read")?;
    let created = opts.now;
    let sequence = match opts.sequence {
        Some(s) => s,
        None => super::sequence::issue(created)?,
    };
    let manifest = Manifest {
        kind: manifest::MANIFEST_TYPE.into(),
        format: manifest::FORMAT,
        release: ReleaseRef {
            name: info.name,
            version: info.version,
        },
        erts: info.erts,
        includes_erts: info.includes_erts,
        apps: info.apps.iter().map(|(a, v)| format!("{a}-{v}")).collect(),
        upgrade_from: info.upgrade_from,
        downgrade_to: info.downgrade_to,
        tarball: TarballRef {
            size,
            sha256: hex::encode(digests.whole),
            chunk_size: opts.chunk_size,
            unpacked_size: info.unpacked_size,
            chunks: digests.chunks.iter().map(hex::encode).collect(),
            parts,
        },
        target: opts.targets.clone(),
        created_at: manifest::format_time(created),
        expires_at: manifest::format_time(created + opts.expires_in),
        sequence,
        allow_downgrade: opts.allow_downgrade,
    };
    manifest.validate()?;
    let envelope = Envelope::sign(DocKind::Manifest, &manifest, keys).to_bytes();

    let mut out_file = AtomicFile::create(out, 0o644, false)?;
    let tmp = out_file.tmp_path().to_path_buf();
    let mut w = io::BufWriter::with_capacity(IO_BUF, &mut out_file);
    let mtime = created
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    write_member(
        &mut w,
        MANIFEST_ENTRY,
        envelope.len() as u64,
        mtime,
        &mut &envelope[..],
    )
    .ctx(&tmp, "write")?;
    // Copy the tarball while hashing it again: a file changed between the two
    // passes must not end up signed with the old digest.
    file.rewind().ctx(release_tar, "read")?;
    let mut hashing = HashingReader {
        inner: file.take(size),
        hasher: Sha256::new(),
    };
    write_member(&mut w, TARBALL_ENTRY, size, mtime, &mut hashing).ctx(&tmp, "write")?;
    if hashing.hasher.finalize().as_slice() != digests.whole {
        return Err(Error::InvalidRelease {
            path: release_tar.to_path_buf(),
            detail: "the file changed while it was being bundled".into(),
        });
    }
    w.write_all(&[0u8; 2 * BLOCK as usize]).ctx(&tmp, "write")?;
    w.flush().ctx(&tmp, "write")?;
    drop(w);
    out_file.commit()?;
    Ok(manifest)
}

/// A file removed when dropped (the repacked tarball, once copied).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}
impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn write_member(
    w: &mut impl Write,
    name: &str,
    size: u64,
    mtime: u64,
    data: &mut impl Read,
) -> io::Result<()> {
    w.write_all(&member_header(name, size, mtime)?)?;
    let copied = io::copy(data, w)?;
    if copied != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{name}: expected {size} bytes, got {copied}"),
        ));
    }
    w.write_all(&vec![0u8; padding(size) as usize])
}
