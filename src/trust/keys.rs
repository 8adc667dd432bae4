//! Ed25519 signing keys and their files.
//!
//! Key files are small JSON documents so that a person can tell a public key
//! from a secret one with `cat` (the secret half is only ever printed by
//! `cat`, never by beamup: [`SecretKey`]'s `Debug` is redacted and nothing
//! logs it). A key is named by its key id, the first 16 hex digits of the
//! SHA-256 of the public key; it only selects which trusted key to try, the
//! signature itself is what is checked.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::limits::LIMITS;

/// The id of a public key: 16 lowercase hex digits.
pub(crate) fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// A trusted (or to-be-trusted) public key.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PublicKey {
    pub(crate) id: String,
    pub(crate) key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id)
    }
}

impl PublicKey {
    /// Parses a hex-encoded 32-byte public key, refusing weak (small-order)
    /// keys, for which a signature proves nothing.
    pub(crate) fn from_hex(hex_key: &str) -> std::result::Result<Self, String> {
        let bytes: [u8; 32] = hex::decode(hex_key)
            .map_err(|e| format!("public key is not hex: {e}"))?
            .try_into()
            .map_err(|_| "public key must be 32 bytes".to_string())?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| "public key is not a valid Ed25519 point".to_string())?;
        if key.is_weak() {
            return Err("public key is a weak (small-order) Ed25519 key".into());
        }
        Ok(PublicKey {
            id: key_id(&key),
            key,
        })
    }

    #[cfg(feature = "operator")]
    pub(crate) fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    #[cfg(feature = "operator")]
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let bytes = fsutil::read_limited(path, LIMITS.key_file_bytes, "key file")?;
        let invalid = |detail: String| Error::InvalidKey {
            path: path.to_path_buf(),
            detail,
        };
        let file: KeyFile = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(format!("not a beamup key file ({e})")))?;
        match file {
            KeyFile::Public { keyid, public_key } => {
                let key = PublicKey::from_hex(&public_key).map_err(invalid)?;
                if key.id != keyid {
                    return Err(invalid(format!(
                        "key id {keyid} does not match the key (its id is {})",
                        key.id
                    )));
                }
                Ok(key)
            }
            // A secret key file also names its public half; accepting it keeps
            // `root init --key` usable with only the secret files at hand.
            KeyFile::Secret { .. } => Ok(SecretKey::load(path)?.public()),
        }
    }
}

/// An Ed25519 signing key. Never printed: `Debug` shows only the key id.
pub struct SecretKey {
    signing: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.id())
    }
}

impl SecretKey {
    #[cfg(feature = "operator")]
    pub(crate) fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| Error::Internal {
            detail: format!("no OS randomness: {e}"),
        })?;
        let signing = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(SecretKey { signing })
    }

    #[cfg(feature = "operator")]
    pub(crate) fn public(&self) -> PublicKey {
        let key = self.signing.verifying_key();
        PublicKey {
            id: key_id(&key),
            key,
        }
    }

    pub(crate) fn id(&self) -> String {
        key_id(&self.signing.verifying_key())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> ed25519_dalek::Signature {
        self.signing.sign(message)
    }

    /// Loads a secret key, refusing a file that others can read: a leaked
    /// signing key lets anyone push code to the fleet.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).ctx(path, "stat")?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::InvalidKey {
                path: path.to_path_buf(),
                detail: format!(
                    "secret key permissions {mode:04o} let others read it; run `chmod 600 {}`",
                    path.display()
                ),
            });
        }
        let bytes = fsutil::read_limited(path, LIMITS.key_file_bytes, "key file")?;
        Self::parse(&bytes, path)
    }

    /// Loads a secret key from the environment variable `var`, which holds
    /// the text of a key file (a CI secret): no file is ever written. The
    /// variable's value never appears in an error.
    #[cfg(feature = "operator")]
    pub fn from_env(var: &str) -> Result<Self> {
        let source = std::path::PathBuf::from(format!("environment variable {var}"));
        let invalid = |detail: &str| Error::InvalidKey {
            path: source.clone(),
            detail: detail.to_string(),
        };
        let Some(value) = std::env::var_os(var) else {
            return Err(invalid(
                "is not set; put the text of the secret .key file in it",
            ));
        };
        let mut bytes = value.into_encoded_bytes();
        let key = if bytes.iter().all(u8::is_ascii_whitespace) {
            // What an undefined CI secret expands to.
            Err(invalid(
                "is empty; put the text of the secret .key file in it",
            ))
        } else if bytes.len() as u64 > LIMITS.key_file_bytes {
            Err(invalid(&format!(
                "holds more than {} bytes; a key file is about 150",
                LIMITS.key_file_bytes
            )))
        } else {
            Self::parse(&bytes, &source)
        };
        bytes.fill(0);
        key
    }

    /// A secret key from the bytes of a key file; `source` names where they
    /// came from in errors, which never quote the bytes.
    fn parse(bytes: &[u8], source: &Path) -> Result<Self> {
        let invalid = |detail: String| Error::InvalidKey {
            path: source.to_path_buf(),
            detail,
        };
        let file: KeyFile = serde_json::from_slice(bytes).map_err(|_| {
            invalid("not a beamup key file (expected JSON with a secret_key)".into())
        })?;
        let KeyFile::Secret { keyid, secret_key } = file else {
            return Err(invalid(
                "this is a public key; signing needs the secret key (the .key file)".into(),
            ));
        };
        let mut seed: [u8; 32] = hex::decode(&secret_key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid("secret_key must be 32 hex-encoded bytes".into()))?;
        let signing = SigningKey::from_bytes(&seed);
        seed.fill(0);
        let key = SecretKey { signing };
        if key.id() != keyid {
            return Err(invalid(format!(
                "key id {keyid} does not match the key (its id is {})",
                key.id()
            )));
        }
        Ok(key)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
enum KeyFile {
    #[serde(rename = "beamup-secret-key")]
    Secret { keyid: String, secret_key: String },
    #[serde(rename = "beamup-public-key")]
    Public { keyid: String, public_key: String },
}

#[cfg(feature = "operator")]
/// The two files `beamup keygen` wrote.
pub(crate) struct KeyPairPaths {
    pub(crate) secret: std::path::PathBuf,
    pub(crate) public: std::path::PathBuf,
    pub(crate) id: String,
}

#[cfg(feature = "operator")]
/// Generates a key pair into `dir` as `NAME.key` (mode 0600) and `NAME.pub`.
/// Refuses to overwrite either file; creates `dir` (mode 0700) if missing.
pub(crate) fn keygen(dir: &Path, name: &str) -> Result<KeyPairPaths> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(Error::Usage(format!(
            "key name {name:?} must be a plain file name"
        )));
    }
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for p in [&secret_path, &public_path] {
        if p.symlink_metadata().is_ok() {
            return Err(Error::Exists { path: p.clone() });
        }
    }
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(dir, "create directory")?;

    let secret = SecretKey::generate()?;
    let public = secret.public();
    let mut secret_json = serde_json::to_vec_pretty(&KeyFile::Secret {
        keyid: public.id.clone(),
        secret_key: hex::encode(secret.signing.to_bytes()),
    })
    .expect("serializable");
    secret_json.push(b'\n');
    let mut public_json = serde_json::to_vec_pretty(&KeyFile::Public {
        keyid: public.id.clone(),
        public_key: public.to_hex(),
    })
    .expect("serializable");
    public_json.push(b'\n');

    fsutil::write_atomic(&secret_path, 0o600, false, &secret_json)?;
    secret_json.fill(0);
    if let Err(e) = fsutil::write_atomic(&public_path, 0o644, false, &public_json) {
        let _ = fs::remove_file(&secret_path);
        return Err(e);
    }
    Ok(KeyPairPaths {
        secret: secret_path,
        public: public_path,
        id: public.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_is_stable_and_short() {
        let k = SecretKey::generate().unwrap();
        assert_eq!(k.id().len(), 16);
        assert_eq!(k.id(), k.public().id);
    }

    #[test]
    fn weak_public_key_is_refused() {
        // The identity point (a small-order point): any "signature" checks out.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let err = PublicKey::from_hex(&hex::encode(identity)).unwrap_err();
        assert!(err.contains("weak"), "{err}");
    }

    #[test]
    fn a_key_file_text_parses_and_errors_never_quote_it() {
        let k = SecretKey::generate().unwrap();
        let secret = hex::encode(k.signing.to_bytes());
        let text = format!(
            "{{\"type\":\"beamup-secret-key\",\"keyid\":\"{}\",\"secret_key\":\"{secret}\"}}\n",
            k.id()
        );
        let source = Path::new("environment variable K");
        assert_eq!(
            SecretKey::parse(text.as_bytes(), source).unwrap().id(),
            k.id()
        );
        // One digit short, a wrong id, a truncated document: each refused
        // without the secret in the message.
        let cases = [
            text.replace(&secret, &secret[1..]),
            text.replace(&k.id(), "0000000000000000"),
            text[..text.len() / 2].to_string(),
        ];
        for bad in cases {
            let err = SecretKey::parse(bad.as_bytes(), source)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("environment variable K: "), "{err}");
            assert!(!err.contains(&secret[1..20]), "{err}");
        }
    }

    #[test]
    fn secret_key_debug_is_redacted() {
        let k = SecretKey::generate().unwrap();
        let shown = format!("{k:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex::encode(k.signing.to_bytes())));
    }
}
