//! Test support that tests, integration tests and benches share: synthetic `.deb`
//! files, throw-away OpenPGP keys, signed local archives and a tiny HTTP server.
//! Nothing here is used by the product itself.

pub mod deb;
pub mod http;
pub mod repo;
pub mod scratch;
pub mod signing;
