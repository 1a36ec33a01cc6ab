//! OpenPGP verification of `InRelease` (clearsigned) and `Release` + `Release.gpg`
//! (detached) against a trusted keyring, with our own policy on top of rPGP:
//!
//! * a signature counts when its issuer (fingerprint or key id) is a trusted
//!   primary key or a *bound* subkey of one (binding and back-signature checked);
//! * keys past their expiry at the time of verification are not trusted, nor are
//!   revoked subkeys, nor expired signatures;
//! * only SHA-2 hashes (SHA-224/256/384/512) are accepted: MD5, SHA-1 and RIPEMD
//!   signatures are rejected as weak;
//! * one good signature out of several is enough (Debian signs with 2–3 keys).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pgp::composed::{CleartextSignedMessage, Deserializable, DetachedSignature, SignedPublicKey};
use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{PublicKey, PublicSubkey, Signature, SignatureType};
use pgp::types::KeyDetails;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("keyring {path}: {reason}")]
    Keyring { path: PathBuf, reason: String },
    #[error("{what}: not a valid OpenPGP signed message: {reason}")]
    Malformed { what: String, reason: String },
    #[error("{what}: no valid signature by a trusted key ({details})")]
    NoValidSignature { what: String, details: String },
}

#[derive(Clone)]
enum AnyKey {
    Primary(PublicKey),
    Sub(PublicSubkey),
}

/// One key that may sign: a primary key or a bound subkey.
#[derive(Clone)]
struct TrustedKey {
    key: AnyKey,
    fingerprint: String,
    key_id: String,
    /// The primary key's fingerprint and first user id, for messages.
    owner: String,
    expires: Option<SystemTime>,
    revoked: bool,
}

/// A set of trusted keys loaded from keyring files (binary or armoured).
#[derive(Clone, Default)]
pub struct Keyring {
    keys: Vec<TrustedKey>,
    sources: Vec<PathBuf>,
}

/// The signed text and who signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The text that was signed, with LF line ends.
    pub text: String,
    /// `FINGERPRINT (user id)` of the key whose signature verified.
    pub signer: String,
}

fn ts(t: pgp::types::Timestamp) -> SystemTime {
    t.into()
}

fn fpr_hex(f: &pgp::types::Fingerprint) -> String {
    hex::encode_upper(f.as_bytes())
}

impl Keyring {
    /// Loads one keyring file. `.gpg` keyrings are binary, `.asc` armoured; both are detected.
    pub fn load(path: &Path) -> Result<Keyring, VerifyError> {
        let mut k = Keyring::default();
        k.add_file(path)?;
        Ok(k)
    }

    pub fn add_file(&mut self, path: &Path) -> Result<(), VerifyError> {
        let err = |reason: String| VerifyError::Keyring {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let n = self.add_bytes(&bytes).map_err(err)?;
        if n == 0 {
            return Err(err("contains no usable public key".into()));
        }
        self.sources.push(path.to_path_buf());
        Ok(())
    }

    /// Adds the keys in `bytes`; returns how many signing-capable keys were added.
    pub fn add_bytes(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let armored = bytes.starts_with(b"-----BEGIN");
        let iter: Box<dyn Iterator<Item = pgp::errors::Result<SignedPublicKey>>> = if armored {
            SignedPublicKey::from_armor_many(std::io::Cursor::new(bytes.to_vec()))
                .map_err(|e| e.to_string())?
                .0
        } else {
            SignedPublicKey::from_bytes_many(std::io::Cursor::new(bytes.to_vec()))
                .map_err(|e| e.to_string())?
        };
        let before = self.keys.len();
        for key in iter {
            let key = key.map_err(|e| e.to_string())?;
            self.add_key(&key);
        }
        Ok(self.keys.len() - before)
    }

    fn add_key(&mut self, key: &SignedPublicKey) {
        let primary = &key.primary_key;
        let pfpr = fpr_hex(&primary.fingerprint());
        // The primary's expiry comes from its newest valid self-certification.
        let mut uid_name = String::new();
        let mut newest: Option<(SystemTime, &Signature)> = None;
        for user in &key.details.users {
            for sig in &user.signatures {
                if sig
                    .verify_certification(primary, pgp::types::Tag::UserId, &user.id)
                    .is_err()
                {
                    continue;
                }
                let created = sig.created().map(ts).unwrap_or(SystemTime::UNIX_EPOCH);
                if newest.is_none_or(|(t, _)| created > t) {
                    newest = Some((created, sig));
                    uid_name = String::from_utf8_lossy(user.id.id()).into_owned();
                }
            }
        }
        let Some((_, selfsig)) = newest else {
            tracing::warn!("key {pfpr}: no valid self-signature, ignored");
            return;
        };
        let created = ts(primary.created_at());
        let expiry = |sig: &Signature, created: SystemTime| {
            sig.key_expiration_time()
                .filter(|d| d.as_secs() != 0)
                .map(|d| created + Duration::from(d))
        };
        let primary_expires = expiry(selfsig, created);
        let primary_revoked = !key.details.revocation_signatures.is_empty();
        let owner = format!("{pfpr} ({uid_name})");
        self.keys.push(TrustedKey {
            key: AnyKey::Primary(primary.clone()),
            fingerprint: pfpr.clone(),
            key_id: hex::encode_upper(primary.legacy_key_id().as_ref()),
            owner: owner.clone(),
            expires: primary_expires,
            revoked: primary_revoked,
        });
        for sub in &key.public_subkeys {
            let bindings: Vec<&Signature> = sub
                .signatures
                .iter()
                .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
                .collect();
            let revoked = sub
                .signatures
                .iter()
                .any(|s| s.typ() == Some(SignatureType::SubkeyRevocation));
            // Binding signatures (and back-signatures for signing subkeys) must verify.
            let Some(binding) = bindings
                .iter()
                .filter(|s| {
                    s.verify_subkey_binding(primary, &sub.key).is_ok()
                        && (!s.key_flags().sign()
                            || s.embedded_signature().is_some_and(|b| {
                                b.verify_primary_key_binding(&sub.key, primary).is_ok()
                            }))
                })
                .max_by_key(|s| s.created().map(|t| t.as_secs()).unwrap_or(0))
            else {
                continue;
            };
            if !binding.key_flags().sign() {
                continue;
            }
            let sub_created = ts(sub.key.created_at());
            let sub_expires = expiry(binding, sub_created);
            self.keys.push(TrustedKey {
                key: AnyKey::Sub(sub.key.clone()),
                fingerprint: fpr_hex(&sub.key.fingerprint()),
                key_id: hex::encode_upper(sub.key.legacy_key_id().as_ref()),
                owner: owner.clone(),
                expires: match (sub_expires, primary_expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
                revoked: revoked || primary_revoked,
            });
        }
    }

    /// How many keys (primaries and signing subkeys) this keyring trusts.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn candidates(&self, sig: &Signature) -> Vec<&TrustedKey> {
        let fprs: Vec<String> = sig
            .issuer_fingerprint()
            .iter()
            .map(|f| fpr_hex(f))
            .collect();
        let ids: Vec<String> = sig
            .issuer_key_id()
            .iter()
            .map(|k| hex::encode_upper(k.as_ref()))
            .collect();
        self.keys
            .iter()
            .filter(|k| fprs.contains(&k.fingerprint) || ids.contains(&k.key_id))
            .collect()
    }

    /// Checks `sigs` over `data` (already normalised as the signature type needs);
    /// returns the signer of the first good one, else a summary of every failure.
    fn check(&self, sigs: &[Signature], data: &[u8], now: SystemTime) -> Result<String, String> {
        let mut problems = Vec::new();
        for sig in sigs {
            let issuer = sig
                .issuer_fingerprint()
                .first()
                .map(|f| fpr_hex(f))
                .or_else(|| {
                    sig.issuer_key_id()
                        .first()
                        .map(|k| hex::encode_upper(k.as_ref()))
                })
                .unwrap_or_else(|| "unknown issuer".into());
            match sig.hash_alg() {
                Some(
                    HashAlgorithm::Sha224
                    | HashAlgorithm::Sha256
                    | HashAlgorithm::Sha384
                    | HashAlgorithm::Sha512,
                ) => {}
                other => {
                    problems.push(format!("{issuer}: weak or unknown hash {other:?}"));
                    continue;
                }
            }
            let cands = self.candidates(sig);
            if cands.is_empty() {
                problems.push(format!("{issuer}: key not in keyring"));
                continue;
            }
            let created = sig.created().map(ts);
            if let (Some(c), Some(d)) = (created, sig.signature_expiration_time()) {
                if d.as_secs() != 0 && c + Duration::from(d) <= now {
                    problems.push(format!("{issuer}: signature expired"));
                    continue;
                }
            }
            for k in cands {
                if k.revoked {
                    problems.push(format!("{}: key revoked", k.fingerprint));
                    continue;
                }
                if k.expires.is_some_and(|e| e <= now) {
                    problems.push(format!("{}: key expired", k.fingerprint));
                    continue;
                }
                let res = match &k.key {
                    AnyKey::Primary(p) => sig.verify(p, data),
                    AnyKey::Sub(s) => sig.verify(s, data),
                };
                match res {
                    Ok(()) => return Ok(format!("{} via {}", k.owner, k.fingerprint)),
                    Err(e) => problems.push(format!("{}: bad signature: {e}", k.fingerprint)),
                }
            }
        }
        if problems.is_empty() {
            problems.push("no signatures".into());
        }
        Err(problems.join("; "))
    }

    /// Verifies a clearsigned `InRelease`; `what` names it in errors (a URL or path).
    pub fn verify_clearsigned(
        &self,
        what: &str,
        bytes: &[u8],
        now: SystemTime,
    ) -> Result<Verified, VerifyError> {
        let text = std::str::from_utf8(bytes).map_err(|e| VerifyError::Malformed {
            what: what.into(),
            reason: e.to_string(),
        })?;
        let (msg, _) =
            CleartextSignedMessage::from_string(text).map_err(|e| VerifyError::Malformed {
                what: what.into(),
                reason: e.to_string(),
            })?;
        let signed = msg.signed_text();
        let signer = self
            .check(msg.signatures(), signed.as_bytes(), now)
            .map_err(|details| VerifyError::NoValidSignature {
                what: what.into(),
                details,
            })?;
        // The signed text with LF ends: undo dash-escaping of the cleartext framework.
        let mut out = String::with_capacity(msg.text().len());
        for line in msg.text().split_inclusive('\n') {
            out.push_str(line.strip_prefix("- ").unwrap_or(line));
        }
        Ok(Verified {
            text: out.replace("\r\n", "\n"),
            signer,
        })
    }

    /// Verifies `Release` against a detached armoured or binary `Release.gpg`.
    pub fn verify_detached(
        &self,
        what: &str,
        data: &[u8],
        sig: &[u8],
        now: SystemTime,
    ) -> Result<Verified, VerifyError> {
        let malformed = |reason: String| VerifyError::Malformed {
            what: format!("{what}.gpg"),
            reason,
        };
        let sigs: Vec<Signature> = if sig.starts_with(b"-----BEGIN") {
            let text = std::str::from_utf8(sig).map_err(|e| malformed(e.to_string()))?;
            // A detached file may hold several armoured blocks or one with several packets.
            let mut v = Vec::new();
            let (iter, _) =
                DetachedSignature::from_armor_many(std::io::Cursor::new(text.as_bytes().to_vec()))
                    .map_err(|e| malformed(e.to_string()))?;
            for s in iter {
                v.push(s.map_err(|e| malformed(e.to_string()))?.signature);
            }
            v
        } else {
            let mut v = Vec::new();
            for s in DetachedSignature::from_bytes_many(std::io::Cursor::new(sig.to_vec()))
                .map_err(|e| malformed(e.to_string()))?
            {
                v.push(s.map_err(|e| malformed(e.to_string()))?.signature);
            }
            v
        };
        let text = std::str::from_utf8(data).map_err(|e| VerifyError::Malformed {
            what: what.into(),
            reason: e.to_string(),
        })?;
        // Text-mode signatures hash CRLF-normalised text; binary ones the bytes.
        let crlf = text.replace("\r\n", "\n").replace('\n', "\r\n");
        let mut last_err = String::new();
        for s in &sigs {
            let input = if s.typ() == Some(SignatureType::Text) {
                crlf.as_bytes()
            } else {
                data
            };
            match self.check(std::slice::from_ref(s), input, now) {
                Ok(signer) => {
                    return Ok(Verified {
                        text: text.to_string(),
                        signer,
                    })
                }
                Err(e) => last_err = e,
            }
        }
        Err(VerifyError::NoValidSignature {
            what: what.into(),
            details: if sigs.is_empty() {
                "no signatures".into()
            } else {
                last_err
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::signing::TestKey;

    #[test]
    fn clearsigned_roundtrip_and_tamper() {
        let key = TestKey::generate("Test Archive <archive@example.invalid>");
        let mut ring = Keyring::default();
        assert!(ring.add_bytes(&key.public_bytes()).unwrap() >= 1);
        let body = "Suite: test\nCodename: test\nSHA256:\n";
        let signed = key.clearsign(body);
        let now = SystemTime::now();
        let v = ring
            .verify_clearsigned("InRelease", signed.as_bytes(), now)
            .unwrap();
        assert_eq!(v.text.trim_end(), body.trim_end());
        assert!(v.signer.contains("Test Archive"));

        let tampered = signed.replace("Suite: test", "Suite: tesu");
        let e = ring
            .verify_clearsigned("InRelease", tampered.as_bytes(), now)
            .unwrap_err();
        assert!(matches!(e, VerifyError::NoValidSignature { .. }), "{e}");

        // An unrelated key does not verify it.
        let other = TestKey::generate("Other <o@example.invalid>");
        let mut ring2 = Keyring::default();
        ring2.add_bytes(&other.public_bytes()).unwrap();
        let e = ring2
            .verify_clearsigned("InRelease", signed.as_bytes(), now)
            .unwrap_err();
        assert!(e.to_string().contains("not in keyring"), "{e}");
    }

    #[test]
    fn detached_roundtrip() {
        let key = TestKey::generate("Test Archive <archive@example.invalid>");
        let mut ring = Keyring::default();
        ring.add_bytes(&key.public_armored().into_bytes()).unwrap();
        let body = b"Suite: test\n";
        let sig = key.detached_sign(body);
        let now = SystemTime::now();
        ring.verify_detached("Release", body, sig.as_bytes(), now)
            .unwrap();
        assert!(ring
            .verify_detached("Release", b"Suite: tesu\n", sig.as_bytes(), now)
            .is_err());
    }

    #[test]
    fn expired_or_revoked_key_rejected() {
        let key = TestKey::generate("Short <s@example.invalid>");
        let mut ring = Keyring::default();
        ring.add_bytes(&key.public_bytes()).unwrap();
        let signed = key.clearsign("Suite: t\n");
        let now = SystemTime::now();
        ring.verify_clearsigned("InRelease", signed.as_bytes(), now)
            .unwrap();
        // The expiry read from the binding signature is what the policy compares.
        let mut expired = ring.clone();
        for k in &mut expired.keys {
            k.expires = Some(now - Duration::from_secs(1));
        }
        let e = expired
            .verify_clearsigned("InRelease", signed.as_bytes(), now)
            .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        let mut revoked = ring.clone();
        for k in &mut revoked.keys {
            k.revoked = true;
        }
        let e = revoked
            .verify_clearsigned("InRelease", signed.as_bytes(), now)
            .unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
    }

    #[test]
    fn host_debian_inrelease_if_present() {
        let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        let lists = Path::new("/var/lib/apt/lists");
        let Ok(rd) = std::fs::read_dir(lists) else {
            eprintln!("SKIP: no /var/lib/apt/lists");
            return;
        };
        if !keyring.exists() {
            eprintln!("SKIP: no Debian archive keyring");
            return;
        }
        let ring = Keyring::load(keyring).unwrap();
        let mut n = 0;
        for e in rd.flatten() {
            let p = e.path();
            if p.to_string_lossy().ends_with("_InRelease") {
                let bytes = std::fs::read(&p).unwrap();
                // Valid-Until is the caller's business; signatures must verify now.
                ring.verify_clearsigned(&p.display().to_string(), &bytes, SystemTime::now())
                    .unwrap();
                n += 1;
            }
        }
        if n == 0 {
            eprintln!("SKIP: no InRelease files under /var/lib/apt/lists");
        }
    }
}
