//! Signed JSON documents (trust roots and manifests) and threshold checking.
//!
//! A document travels as an envelope `{"signed": {...}, "signatures": [...]}`.
//! Signatures cover the exact bytes of the `signed` value as they appear in
//! the file (kept verbatim through `serde_json::value::RawValue`), so there is
//! no canonical-JSON step that two implementations could disagree on. The
//! signed message is prefixed with the document kind (domain separation), so a
//! signature over a root can never be replayed as a signature over a manifest.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::limits::LIMITS;
use crate::trust::keys::{PublicKey, SecretKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocKind {
    Root,
    Manifest,
}

impl DocKind {
    fn domain(self) -> &'static [u8] {
        match self {
            DocKind::Root => b"beamup-root-v1\n",
            DocKind::Manifest => b"beamup-manifest-v1\n",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub(crate) signed: Box<RawValue>,
    pub(crate) signatures: Vec<SignatureEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignatureEntry {
    pub(crate) keyid: String,
    pub(crate) sig: String,
}

/// The keys and threshold a document is checked against.
pub(crate) struct Trust<'a> {
    pub(crate) keys: &'a BTreeMap<String, PublicKey>,
    pub(crate) revoked: &'a BTreeSet<String>,
    pub(crate) threshold: usize,
}

fn message(kind: DocKind, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(kind.domain().len() + body.len());
    m.extend_from_slice(kind.domain());
    m.extend_from_slice(body);
    m
}

impl Envelope {
    /// Serializes `value` and signs the bytes with every key in `keys`.
    pub fn sign<T: Serialize>(kind: DocKind, value: &T, keys: &[SecretKey]) -> Envelope {
        let body = serde_json::to_string_pretty(value).expect("document serializes");
        let msg = message(kind, body.as_bytes());
        let mut seen = BTreeSet::new();
        let signatures = keys
            .iter()
            .filter(|k| seen.insert(k.id()))
            .map(|k| SignatureEntry {
                keyid: k.id(),
                sig: hex::encode(k.sign(&msg).to_bytes()),
            })
            .collect();
        Envelope {
            signed: RawValue::from_string(body).expect("valid JSON"),
            signatures,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("envelope serializes");
        v.push(b'\n');
        v
    }

    /// Parses an envelope; the caller decides what a failure means (a bundle
    /// that is not one, a broken root file).
    pub(crate) fn parse(bytes: &[u8]) -> std::result::Result<Envelope, String> {
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if env.signatures.len() > LIMITS.envelope_signatures {
            return Err(format!(
                "{} signatures, at most {} are allowed",
                env.signatures.len(),
                LIMITS.envelope_signatures
            ));
        }
        Ok(env)
    }

    /// The signed document, parsed. Call only after [`Envelope::verify`].
    pub(crate) fn body<T: for<'de> Deserialize<'de>>(&self) -> std::result::Result<T, String> {
        serde_json::from_str(self.signed.get()).map_err(|e| e.to_string())
    }

    /// Checks the signatures against `trust`. Returns the ids of the keys
    /// whose signatures verified when they meet the threshold; otherwise the
    /// most telling reason they do not (a bad signature from a trusted key
    /// first: that means tampering).
    pub(crate) fn verify(
        &self,
        kind: DocKind,
        trust: &Trust<'_>,
        what: &str,
    ) -> Result<Vec<String>> {
        let msg = message(kind, self.signed.get().as_bytes());
        let mut valid = BTreeSet::new();
        let mut bad = None;
        let mut revoked = None;
        let mut unknown = Vec::new();
        for s in &self.signatures {
            match trust.keys.get(&s.keyid) {
                Some(pk) => {
                    let ok = hex::decode(&s.sig)
                        .ok()
                        .and_then(|b| Signature::from_slice(&b).ok())
                        .is_some_and(|sig| pk.key.verify_strict(&msg, &sig).is_ok());
                    if ok {
                        valid.insert(s.keyid.clone());
                    } else {
                        bad.get_or_insert_with(|| s.keyid.clone());
                    }
                }
                None if trust.revoked.contains(&s.keyid) => {
                    revoked.get_or_insert_with(|| s.keyid.clone());
                }
                None => unknown.push(s.keyid.clone()),
            }
        }
        if valid.len() >= trust.threshold.max(1) {
            return Ok(valid.into_iter().collect());
        }
        let what = what.to_string();
        Err(if let Some(keyid) = bad {
            Error::BadSignature { what, keyid }
        } else if let Some(keyid) = revoked {
            Error::RevokedKey { what, keyid }
        } else if valid.is_empty() && !unknown.is_empty() {
            Error::UnknownKey {
                what,
                keyids: unknown,
            }
        } else {
            Error::Threshold {
                what,
                valid: valid.len(),
                needed: trust.threshold,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust_of(keys: &[&SecretKey]) -> BTreeMap<String, PublicKey> {
        keys.iter().map(|k| (k.id(), k.public())).collect()
    }

    #[test]
    fn signature_covers_exact_bytes_and_kind() {
        let k = SecretKey::generate().unwrap();
        let env = Envelope::sign(DocKind::Manifest, &serde_json::json!({"a": 1}), &[k]);
        let k = &env.signatures[0];
        assert_eq!(k.sig.len(), 128);
        let bytes = env.to_bytes();
        let reparsed = Envelope::parse(&bytes).unwrap();
        assert_eq!(reparsed.signed.get(), env.signed.get());
    }

    #[test]
    fn domain_separation_rejects_cross_kind_reuse() {
        let k = SecretKey::generate().unwrap();
        let keys = trust_of(&[&k]);
        let revoked = BTreeSet::new();
        let trust = Trust {
            keys: &keys,
            revoked: &revoked,
            threshold: 1,
        };
        let env = Envelope::sign(DocKind::Root, &serde_json::json!({"a": 1}), &[k]);
        assert!(env.verify(DocKind::Root, &trust, "doc").is_ok());
        let err = env.verify(DocKind::Manifest, &trust, "doc").unwrap_err();
        assert!(matches!(err, Error::BadSignature { .. }), "{err}");
    }

    #[test]
    fn duplicate_signatures_count_once() {
        let k = SecretKey::generate().unwrap();
        let keys = trust_of(&[&k]);
        let revoked = BTreeSet::new();
        let mut env = Envelope::sign(DocKind::Manifest, &serde_json::json!({}), &[k]);
        env.signatures.push(env.signatures[0].clone());
        let trust = Trust {
            keys: &keys,
            revoked: &revoked,
            threshold: 2,
        };
        let err = env.verify(DocKind::Manifest, &trust, "doc").unwrap_err();
        assert!(
            matches!(
                err,
                Error::Threshold {
                    valid: 1,
                    needed: 2,
                    ..
                }
            ),
            "{err}"
        );
    }
}
