//! The trust root: which keys may sign releases, and how many must.
//!
//! A device trusts one root document. It lists public keys by id and a
//! threshold k: a manifest needs valid signatures from k distinct listed keys.
//! Rotation produces root version n+1, which must be signed by a threshold of
//! the *current* root's keys (so a stolen new key alone cannot take over) and
//! by a threshold of its own keys (so nobody can publish a root they cannot
//! use). Keys dropped by a rotation are recorded as revoked, which lets a
//! device say "revoked" rather than "unknown" when one still shows up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::limits::LIMITS;
use crate::trust::keys::PublicKey;
#[cfg(feature = "operator")]
use crate::trust::keys::SecretKey;
use crate::trust::signed::{DocKind, Envelope, Trust};

const ROOT_TYPE: &str = "beamup-root";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootBody {
    #[serde(rename = "type")]
    kind: String,
    version: u64,
    threshold: usize,
    /// key id -> hex public key
    keys: BTreeMap<String, String>,
    #[serde(default)]
    revoked: BTreeSet<String>,
    created_at: String,
}

/// A parsed, self-consistent trust root.
#[derive(Clone, Debug)]
pub struct Root {
    pub(crate) version: u64,
    pub(crate) threshold: usize,
    pub(crate) keys: BTreeMap<String, PublicKey>,
    pub(crate) revoked: BTreeSet<String>,
    /// Carried into a rotated root (an operator command).
    #[cfg_attr(not(feature = "operator"), allow(dead_code))]
    pub(crate) created_at: String,
}

impl Root {
    pub(crate) fn trust(&self) -> Trust<'_> {
        Trust {
            keys: &self.keys,
            revoked: &self.revoked,
            threshold: self.threshold,
        }
    }

    /// Loads a root file and checks that it is well formed and signed by a
    /// threshold of its own keys.
    pub fn load(path: &Path) -> Result<Root> {
        let bytes = fsutil::read_limited(path, LIMITS.root_file_bytes, "trust root")?;
        let (root, _) = Self::parse(&bytes, path)?;
        Ok(root)
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<(Root, Envelope)> {
        let invalid = |detail: String| Error::InvalidRoot {
            path: path.to_path_buf(),
            detail,
        };
        let env =
            Envelope::parse(bytes).map_err(|e| invalid(format!("not a root document: {e}")))?;
        let body: RootBody = env
            .body()
            .map_err(|e| invalid(format!("not a root document: {e}")))?;
        let root = Root::from_body(body).map_err(invalid)?;
        env.verify(
            DocKind::Root,
            &root.trust(),
            &format!("trust root {}", path.display()),
        )?;
        Ok((root, env))
    }

    fn from_body(body: RootBody) -> std::result::Result<Root, String> {
        if body.kind != ROOT_TYPE {
            return Err(format!("type is {:?}, expected {ROOT_TYPE:?}", body.kind));
        }
        let keys = body
            .keys
            .iter()
            .map(|(id, hex_key)| {
                let pk = PublicKey::from_hex(hex_key).map_err(|e| format!("key {id}: {e}"))?;
                if &pk.id != id {
                    return Err(format!("key listed as {id} has id {}", pk.id));
                }
                Ok((pk.id.clone(), pk))
            })
            .collect::<std::result::Result<BTreeMap<_, _>, String>>()?;
        check_shape(body.version, body.threshold, &keys)?;
        if let Some(id) = body.revoked.iter().find(|id| keys.contains_key(*id)) {
            return Err(format!("key {id} is listed both as trusted and as revoked"));
        }
        Ok(Root {
            version: body.version,
            threshold: body.threshold,
            keys,
            revoked: body.revoked,
            created_at: body.created_at,
        })
    }

    #[cfg(feature = "operator")]
    fn body(&self) -> RootBody {
        RootBody {
            kind: ROOT_TYPE.into(),
            version: self.version,
            threshold: self.threshold,
            keys: self
                .keys
                .iter()
                .map(|(id, k)| (id.clone(), k.to_hex()))
                .collect(),
            revoked: self.revoked.clone(),
            created_at: self.created_at.clone(),
        }
    }

    #[cfg(feature = "operator")]
    /// A first root (version 1), signed by `signers`, who must be a threshold
    /// of the listed keys.
    pub(crate) fn init(
        keys: Vec<PublicKey>,
        threshold: usize,
        signers: &[SecretKey],
    ) -> Result<Envelope> {
        let root = Root::new(1, keys, threshold, BTreeSet::new())?;
        let env = Envelope::sign(DocKind::Root, &root.body(), signers);
        env.verify(DocKind::Root, &root.trust(), "new trust root")?;
        Ok(env)
    }

    #[cfg(feature = "operator")]
    /// The successor of `self` with a new key list and threshold, signed by
    /// `signers`, who must be a threshold of both the current and the new
    /// keys. Keys that leave are added to the revoked list.
    pub(crate) fn rotate(
        &self,
        keys: Vec<PublicKey>,
        threshold: usize,
        signers: &[SecretKey],
    ) -> Result<Envelope> {
        let mut revoked = self.revoked.clone();
        let new_ids: BTreeSet<&String> = keys.iter().map(|k| &k.id).collect();
        revoked.extend(self.keys.keys().filter(|id| !new_ids.contains(id)).cloned());
        // A key that comes back is trusted again, explicitly.
        for id in &new_ids {
            revoked.remove(*id);
        }
        let next = Root::new(self.version + 1, keys, threshold, revoked)?;
        let env = Envelope::sign(DocKind::Root, &next.body(), signers);
        env.verify(
            DocKind::Root,
            &self.trust(),
            "rotated root (by the current root's keys)",
        )?;
        env.verify(
            DocKind::Root,
            &next.trust(),
            "rotated root (by its own keys)",
        )?;
        Ok(env)
    }

    /// Checks that `bytes` is a valid successor of `self`: version exactly one
    /// higher, signed by a threshold of the current keys and of its own.
    pub(crate) fn verify_successor(&self, bytes: &[u8], path: &Path) -> Result<Root> {
        let (next, env) = Self::parse(bytes, path)?;
        if next.version != self.version + 1 {
            return Err(Error::InvalidRoot {
                path: path.to_path_buf(),
                detail: format!(
                    "version {} does not follow the trusted root's version {} (rotate one version at a time)",
                    next.version, self.version
                ),
            });
        }
        env.verify(
            DocKind::Root,
            &self.trust(),
            &format!("trust root {} (by the current root's keys)", path.display()),
        )?;
        Ok(next)
    }

    #[cfg(feature = "operator")]
    fn new(
        version: u64,
        keys: Vec<PublicKey>,
        threshold: usize,
        revoked: BTreeSet<String>,
    ) -> Result<Root> {
        let keys: BTreeMap<String, PublicKey> =
            keys.into_iter().map(|k| (k.id.clone(), k)).collect();
        check_shape(version, threshold, &keys).map_err(Error::Usage)?;
        Ok(Root {
            version,
            threshold,
            keys,
            revoked,
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        })
    }
}

fn check_shape(
    version: u64,
    threshold: usize,
    keys: &BTreeMap<String, PublicKey>,
) -> std::result::Result<(), String> {
    if version == 0 {
        return Err("version must be at least 1".into());
    }
    if keys.is_empty() {
        return Err("a root needs at least one key".into());
    }
    if keys.len() > LIMITS.root_keys {
        return Err(format!(
            "{} keys, at most {} allowed",
            keys.len(),
            LIMITS.root_keys
        ));
    }
    if threshold == 0 || threshold > keys.len() {
        return Err(format!(
            "threshold {threshold} must be between 1 and the number of keys ({})",
            keys.len()
        ));
    }
    Ok(())
}
