//! What the fuzz targets share: scratch directories, signing keys, and the
//! framing of several messages in one input.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use beamup::fuzzing::Signers;

/// This process's scratch directory: under `$BEAMUP_FUZZ_TMP` (what
/// `fuzz/run` gives, on tmpfs where there is one), else the system's.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("BEAMUP_FUZZ_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let d = base.join(format!("beamup-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// An empty directory `name` in the scratch directory (emptied if it was
/// there).
pub fn fresh(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("fresh directory");
    d
}

/// The fuzzers' own three keys (`keys/`, made with `beamup keygen`; they
/// sign nothing outside this directory) and their root, threshold 2. Fixed,
/// so that the seeds signed with them verify.
pub fn signers() -> &'static Signers {
    static S: OnceLock<Signers> = OnceLock::new();
    S.get_or_init(|| {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("keys");
        let keys: Vec<PathBuf> = ["alice", "bob", "carol"]
            .iter()
            .map(|k| d.join(format!("{k}.key")))
            .collect();
        // git keeps no 0600, which a secret key file must have.
        for k in &keys {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o600));
        }
        beamup::fuzzing::load_signers(&keys, &d.join("root.json")).expect("fuzz/keys")
    })
}

/// Splits an input into messages, each a big-endian u16 length and that
/// many bytes; what is left at the end is the last one.
pub fn messages(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// The inverse of [`messages`] (for seeds).
pub fn frame_messages<'a>(msgs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend((m.len() as u16).to_be_bytes());
        out.extend(m);
    }
    out
}
