//! packer-plugin-nspawn: a Packer builder for systemd-nspawn machines with a
//! native Debian/Ubuntu bootstrap.
//!
//! The modules follow the pipeline a build walks through:
//!
//! ```text
//! archive  → resolve → fetch → unpack → dpkg → (sandbox → machine) → packer → builder → cli
//! ```
//!
//! * [`archive`]  — host APT sources, Release/InRelease (OpenPGP-verified), Packages indices.
//! * [`resolve`]  — the package set debootstrap would install (variants, include/exclude).
//! * [`fetch`]    — HTTP/`file://` downloads with SHA256 checks, retries and a `.deb` cache.
//! * [`unpack`]   — `.deb` reading (ar + tar + xz/zstd/gz/bz2) and safe extraction.
//! * [`dpkg`]     — the dpkg database (`status`, `info/*`) for an unpacked package set.
//! * [`image`]    — importing, cloning and exporting machine images (tarballs, raw, trees).
//! * [`bootstrap`] — the orchestration of the steps above into a root filesystem.
//! * [`machine`]  — booting a tree with systemd-nspawn, running commands in it, stopping it.
//! * [`packer`]   — Packer's plugin protocol.
//! * [`testkit`]  — generated `.deb`s and signed test archives for tests and benches.

pub mod archive;
pub mod bench;
pub mod bootstrap;
pub mod builder;
pub mod cache;
pub mod dpkg;
pub mod fetch;
pub mod image;
pub mod machine;
pub mod packer;
pub mod resolve;
pub mod sandbox;
pub mod sys;
#[doc(hidden)]
pub mod testkit;
pub mod unpack;
