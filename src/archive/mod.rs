//! The archive client: where packages come from and proof that they are genuine.
//!
//! It owns the host's APT sources (defaults), the suite's `InRelease`/`Release`
//! (OpenPGP-verified), and the `Packages` indices checked against the Release's
//! SHA256 list.

pub mod client;
pub mod deb822;
pub mod packages;
pub mod release;
pub mod sources;
pub mod verify;
pub mod version;
