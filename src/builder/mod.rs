//! The `nspawn` Packer builder: prepare the target, make the tree (native
//! bootstrap, import or clone) under a staging name, boot it with
//! systemd-nspawn (or not, with `boot = false`), hand Packer a communicator,
//! scrub host identity, stop, export, and rename the staging tree to the
//! machine's name. Cancellation and failures stop the container and remove the
//! staging tree; `-on-error=abort` keeps the tree and says how to enter it.

pub mod comm;
pub mod config;
mod image_api;
mod steps;

use std::sync::{Arc, Mutex};

use crate::packer::rpc::BoxFuture;
use crate::packer::{Artifact, BuildError, Builder, Config, ConfigSpec, Prepared, RunContext};

pub use config::{Settings, Source};

/// Builder id reported in artifacts.
pub const BUILDER_ID: &str = "nspawn.builder";

/// Errors of the build steps, each naming the step and its subject.
#[derive(Debug, thiserror::Error)]
pub enum BuildStepError {
    #[error("prepare target: machine {name} already exists in {dir} (use -force to replace it)")]
    Exists { name: String, dir: String },
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bootstrap: {0}")]
    Bootstrap(#[from] crate::bootstrap::BootstrapError),
    #[error("{0}")]
    Image(String),
    #[error("boot: {0}")]
    Machine(#[from] crate::machine::MachineError),
    #[error("private_users: {0}")]
    Shift(#[from] crate::sandbox::SandboxError),
    #[error("{what}")]
    Other { what: String },
    #[error("build cancelled")]
    Cancelled,
}

/// The builder.
#[derive(Default)]
pub struct NspawnBuilder {
    settings: Mutex<Option<Settings>>,
}

/// Factory for [`crate::packer::BuilderSet`].
pub fn factory() -> Arc<dyn Builder> {
    Arc::new(NspawnBuilder::default())
}

impl Builder for NspawnBuilder {
    fn config_spec(&self) -> ConfigSpec {
        config::spec()
    }

    fn prepare(&self, config: Config) -> Result<Prepared, Vec<String>> {
        let (s, warnings) = config::settle(&config)?;
        *self.settings.lock().unwrap() = Some(s);
        Ok(Prepared {
            generated_vars: vec!["MachineName".into(), "MachinePath".into()],
            warnings,
        })
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<'_, Result<Option<Artifact>, BuildError>> {
        Box::pin(async move {
            let s = self
                .settings
                .lock()
                .unwrap()
                .clone()
                .ok_or("nspawn: Run before Prepare")?;
            steps::run(s, ctx).await.map_err(|e| e.into())
        })
    }
}
