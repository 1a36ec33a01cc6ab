//! Packer's plugin protocol, served natively (no Go): launch and handshake,
//! yamux, the MuxBroker, net/rpc with msgpack bodies, the gob/protobuf
//! ConfigSpec, and the Builder/Ui/Hook/Communicator/Artifact services.
//!
//! A builder implements [`Builder`] (and a [`Communicator`] for its
//! machine); [`plugin_main`] serves it to Packer 1.6.6 and Packer ≥ 1.7.
//!
//! # Which Packer finds what (`packer-plugin-nspawn install`)
//!
//! * Packer 1.6.6 … 1.10: `~/.packer.d/plugins/packer-builder-nspawn`
//!   (or `$PACKER_CONFIG_DIR/.packer.d/plugins/`), builder type `nspawn`.
//!   The same binary dropped there as `packer-plugin-nspawn` is also loaded
//!   (types `nspawn-<builder>`), via `describe` and `start builder NAME`.
//! * Packer ≥ 1.11 loads only installed plugins:
//!   `<plugins>/github.com/packer-plugin-nspawn/nspawn/packer-plugin-nspawn_vX.Y.Z_x5.0_linux_amd64`
//!   plus its `_SHA256SUM`, where `<plugins>` is `$PACKER_PLUGIN_PATH` or
//!   `~/.packer.d/plugins`.
//!
//! # Handshake choice
//!
//! `--protobuf` in argv means Packer ≥ 1.12 (4-field line, protobuf
//! ConfigSpec). Otherwise the parent's version (`<parent exe> version`)
//! decides: < 1.7 gets the 3-field line, anything else (or an unknown
//! parent) the 4-field one; the ConfigSpec is gob, with the nested
//! ObjectSpec named after Debian's vendor path when the parent binary
//! contains it. `PACKER_PLUGIN_NSPAWN_PROTO=legacy|modern` and
//! `PACKER_PLUGIN_NSPAWN_OBJSPEC=debian|module` override the probes;
//! `PACKER_PLUGIN_NSPAWN_LOG` sets the stderr log filter (default `info`).

pub mod api;
pub mod broker;
pub mod config;
pub mod gob;
pub mod hosttest;
pub mod interp;
pub mod launch;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod spec;
pub mod yamux;

pub use api::{
    provision_hook_data, Artifact, BuildError, Builder, Communicator, DestroyFn, Hook, Prepared,
    Progress, RemoteCmd, RunContext, Ui, HOOK_CLEANUP_PROVISION, HOOK_PROVISION,
};
pub use config::{Config, PackerVars};
pub use launch::{install, plugin_main, BuilderFactory, BuilderSet, InstallLayout};
pub use rpc::BoxFuture;
pub use spec::{ConfigSpec, CtyType, ObjectSpec, Spec};

/// Errors of the launch and install steps.
#[derive(Debug, thiserror::Error)]
pub enum PackerError {
    #[error(
        "usage: {0} (expected `describe`, `start builder [--protobuf] NAME`, or no arguments)"
    )]
    Usage(String),
    #[error("this plugin has no builder named {0:?}")]
    UnknownBuilder(String),
    #[error("plugin listener: {0}")]
    Listen(String),
    #[error("yamux session with Packer ended: {0}")]
    Session(String),
    #[error("install: {0}")]
    Install(String),
}

/// The builders this binary serves: `nspawn` (the product) and `hosttest`.
pub fn default_builders() -> BuilderSet {
    BuilderSet::default()
        .with("hosttest", hosttest::factory)
        .with("nspawn", crate::builder::factory)
}
