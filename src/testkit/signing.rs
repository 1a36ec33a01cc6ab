//! OpenPGP keys made on the spot for test archives: an Ed25519 primary key that
//! only certifies, with a signing subkey, the same shape as Debian's archive keys.

use pgp::composed::{
    ArmorOptions, CleartextSignedMessage, DetachedSignature, EncryptionCaps, KeyType,
    SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey, SubkeyParamsBuilder,
};
use pgp::crypto::hash::HashAlgorithm;
use pgp::ser::Serialize;
use pgp::types::Password;

/// A throw-away archive signing key.
pub struct TestKey {
    secret: SignedSecretKey,
}

impl TestKey {
    /// Generates a key for `uid` (takes a few milliseconds).
    pub fn generate(uid: &str) -> TestKey {
        let mut sub = SubkeyParamsBuilder::default();
        sub.key_type(KeyType::Ed25519Legacy)
            .can_sign(true)
            .can_encrypt(EncryptionCaps::None)
            .can_authenticate(false);
        let mut params = SecretKeyParamsBuilder::default();
        params
            .key_type(KeyType::Ed25519Legacy)
            .can_certify(true)
            .can_sign(false)
            .can_encrypt(EncryptionCaps::None)
            .primary_user_id(uid.into())
            .subkeys(vec![sub.build().expect("subkey params")]);
        let secret = params
            .build()
            .expect("key params")
            .generate(rand::thread_rng())
            .expect("key generation");
        TestKey { secret }
    }

    fn public(&self) -> SignedPublicKey {
        self.secret.to_public_key()
    }

    /// The public key as a binary keyring (like `/usr/share/keyrings/*.gpg`).
    pub fn public_bytes(&self) -> Vec<u8> {
        self.public().to_bytes().expect("serialise public key")
    }

    /// The public key armoured (like a `.asc` keyring).
    pub fn public_armored(&self) -> String {
        self.public()
            .to_armored_string(ArmorOptions::default())
            .expect("armour public key")
    }

    /// Clearsigns `text` with the signing subkey (an `InRelease` file).
    pub fn clearsign(&self, text: &str) -> String {
        let signer = &self.secret.secret_subkeys[0].key;
        let msg =
            CleartextSignedMessage::sign(rand::thread_rng(), text, signer, &Password::empty())
                .expect("clearsign");
        msg.to_armored_string(ArmorOptions::default())
            .expect("armour clearsigned message")
    }

    /// An armoured detached binary signature of `data` (a `Release.gpg` file).
    pub fn detached_sign(&self, data: &[u8]) -> String {
        let signer = &self.secret.secret_subkeys[0].key;
        let sig = DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            signer,
            &Password::empty(),
            HashAlgorithm::Sha256,
            data,
        )
        .expect("detached signature");
        sig.to_armored_string(ArmorOptions::default())
            .expect("armour signature")
    }
}
