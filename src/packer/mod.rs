//! Packer's plugin protocol, served natively (no Go): launch and handshake,
//! yamux, the MuxBroker, net/rpc with msgpack bodies, the gob/protobuf
//! ConfigSpec, and the Builder/Ui/Hook/Communicator/Artifact services.
//!
//! A builder implements [`Builder`] (and a [`Communicator`] for its
//! machine); [`plugin_main`] serves it to Packer 1.6.6 and Packer ≥ 1.7.

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

/// The builders this binary serves today (`hosttest`; `nspawn` comes later).
pub fn default_builders() -> BuilderSet {
    BuilderSet::default().with("hosttest", hosttest::factory)
}
