//! The builder-facing API: the [`Builder`] and [`Communicator`] traits a
//! builder implements, and the [`Ui`], [`Hook`] and [`Artifact`] it uses.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rmpv::Value as Mp;
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::broker::Broker;
use super::config::{json_to_mp, Config};
use super::rpc::{self, BoxFuture, Client, RpcError};
use super::spec::ConfigSpec;

/// Error type of a build (anything displayable; Packer prints the text).
pub type BuildError = Box<dyn std::error::Error + Send + Sync>;

/// What `prepare` returns on success.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// Names the builder puts into the hook data (`build.<Name>` in HCL,
    /// ``{{ build `Name` }}`` in JSON provisioners).
    pub generated_vars: Vec<String>,
    /// Printed by Packer as warnings.
    pub warnings: Vec<String>,
}

/// A builder served over Packer's protocol. One process serves one builder
/// instance: `prepare` is called before `run` on the same value.
pub trait Builder: Send + Sync + 'static {
    /// The HCL2 schema of the options (the `packer_*` ones are added for you).
    fn config_spec(&self) -> ConfigSpec;
    /// Validates and stores the options. Return every problem at once; each
    /// message should name its option.
    fn prepare(&self, config: Config) -> Result<Prepared, Vec<String>>;
    /// Runs the build. `ctx.cancel` fires when Packer cancels (Ctrl-C, SIGTERM).
    fn run(&self, ctx: RunContext) -> BoxFuture<'_, Result<Option<Artifact>, BuildError>>;
    /// Called on `Builder.Cancel` (after `ctx.cancel` fired). Must not block.
    fn cancel(&self) {}
}

/// Handed to [`Builder::run`].
pub struct RunContext {
    pub ui: Ui,
    pub hook: Hook,
    pub cancel: CancellationToken,
}

/// A command to run in the machine, with optional streams (absent streams
/// were not requested by Packer).
pub struct RemoteCmd {
    pub command: String,
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
}

/// How provisioners reach the machine. `UploadDir`'s source and
/// `DownloadDir`'s destination are paths on the Packer host.
pub trait Communicator: Send + Sync + 'static {
    /// Runs the command to completion and gives its exit status. The streams
    /// in `cmd` must be dropped (or shut down) by the time this returns.
    fn start(&self, cmd: RemoteCmd) -> BoxFuture<'_, io::Result<i32>>;
    /// Stores everything read from `data` at `dst`; `mode` is the source
    /// file's permission bits when Packer sent them.
    fn upload(
        &self,
        dst: String,
        data: Box<dyn AsyncRead + Send + Unpin>,
        mode: Option<u32>,
    ) -> BoxFuture<'_, io::Result<()>>;
    /// Copies the host directory `src` to `dst` (a `src` ending in `/`
    /// copies its contents, otherwise the directory itself), skipping
    /// `exclude` patterns.
    fn upload_dir(
        &self,
        dst: String,
        src: PathBuf,
        exclude: Vec<String>,
    ) -> BoxFuture<'_, io::Result<()>>;
    /// Writes the file `src` into `out`.
    fn download(
        &self,
        src: String,
        out: Box<dyn AsyncWrite + Send + Unpin>,
    ) -> BoxFuture<'_, io::Result<()>>;
    /// Copies the machine's directory `src` to the host path `dst`.
    fn download_dir(
        &self,
        src: String,
        dst: PathBuf,
        exclude: Vec<String>,
    ) -> BoxFuture<'_, io::Result<()>>;
}

/// Type of [`Artifact::destroy`].
pub type DestroyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The result of a build, served to Packer and its post-processors.
#[derive(Clone, Default)]
pub struct Artifact {
    pub builder_id: String,
    pub id: String,
    pub files: Vec<String>,
    /// Human-readable description (`Artifact.String`).
    pub description: String,
    /// `Artifact.State(key)` answers; put the hook data under `generated_data`.
    pub state: Map<String, Value>,
    /// Removes the artifact (`Artifact.Destroy`).
    pub destroy: Option<DestroyFn>,
}

impl std::fmt::Debug for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifact")
            .field("builder_id", &self.builder_id)
            .field("id", &self.id)
            .field("files", &self.files)
            .finish()
    }
}

/// Packer's UI, reached over the `Builder.Run` stream.
#[derive(Clone)]
pub struct Ui {
    client: Client,
}

impl Ui {
    pub(crate) fn new(client: Client) -> Self {
        Ui { client }
    }

    async fn simple(&self, method: &str, arg: Mp) {
        if let Err(e) = self.client.call(method, arg).await {
            tracing::warn!("{method} failed: {e}");
        }
    }
    /// "==> name: msg"
    pub async fn say(&self, msg: &str) {
        self.simple("Ui.Say", Mp::from(msg)).await
    }
    /// "    name: msg"
    pub async fn message(&self, msg: &str) {
        self.simple("Ui.Message", Mp::from(msg)).await
    }
    /// An error line (red).
    pub async fn error(&self, msg: &str) {
        self.simple("Ui.Error", Mp::from(msg)).await
    }
    /// A machine-readable line.
    pub async fn machine(&self, category: &str, args: &[&str]) {
        let arg = rpc::map([
            ("Category", Mp::from(category)),
            (
                "Args",
                Mp::Array(args.iter().map(|a| Mp::from(*a)).collect()),
            ),
        ]);
        self.simple("Ui.Machine", arg).await
    }
    /// Asks the user (needs a TTY on Packer's side).
    pub async fn ask(&self, question: &str) -> Result<String, RpcError> {
        let v = self.client.call("Ui.Ask", Mp::from(question)).await?;
        Ok(rpc::as_string(&v).unwrap_or_default())
    }
    /// Starts a progress bar for `src` of `total` bytes.
    pub async fn track_progress(&self, src: &str, total: i64) -> Result<Progress, RpcError> {
        let arg = rpc::map([
            ("Src", Mp::from(src)),
            ("TotalSize", Mp::from(total)),
            ("CurrentSize", Mp::from(0)),
        ]);
        let id = self.client.call("Ui.NewTrackProgress", arg).await?;
        Ok(Progress {
            client: self.client.clone(),
            id: rpc::as_string(&id).unwrap_or_default(),
        })
    }
}

/// A progress bar in Packer's UI.
pub struct Progress {
    client: Client,
    id: String,
}

impl Progress {
    pub async fn add(&self, n: i64) {
        let _ = self
            .client
            .call(&format!("Ui{}.Add", self.id), Mp::from(n))
            .await;
    }
    pub async fn close(self) {
        let _ = self
            .client
            .call(&format!("Ui{}.Close", self.id), Mp::Nil)
            .await;
    }
}

/// Packer's hooks (provisioners), reached over the `Builder.Run` stream.
#[derive(Clone)]
pub struct Hook {
    pub(crate) client: Client,
    pub(crate) broker: Broker,
    pub(crate) cancel: CancellationToken,
}

/// The standard hook name for provisioning.
pub const HOOK_PROVISION: &str = "packer_provision";
/// The hook for `error-cleanup-provisioner`.
pub const HOOK_CLEANUP_PROVISION: &str = "packer_cleanup_provision";

/// The hook data the SDK's builders send (`PopulateProvisionHookData`),
/// with `generated` merged in.
pub fn provision_hook_data(
    instance_id: &str,
    conn_type: &str,
    generated: &Map<String, Value>,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ID".into(), Value::from(instance_id));
    m.insert(
        "PackerRunUUID".into(),
        Value::from(std::env::var("PACKER_RUN_UUID").unwrap_or_default()),
    );
    m.insert(
        "PackerHTTPIP".into(),
        Value::from("ERR_HTTP_IP_NOT_IMPLEMENTED_BY_BUILDER"),
    );
    m.insert(
        "PackerHTTPPort".into(),
        Value::from("ERR_HTTP_PORT_NOT_IMPLEMENTED_BY_BUILDER"),
    );
    m.insert(
        "PackerHTTPAddr".into(),
        Value::from("ERR_HTTP_ADDR_NOT_IMPLEMENTED_BY_BUILDER"),
    );
    m.insert("Host".into(), Value::from(""));
    m.insert("Port".into(), Value::from(0));
    m.insert("User".into(), Value::from(""));
    m.insert("Password".into(), Value::from(""));
    m.insert("ConnType".into(), Value::from(conn_type));
    m.insert("SSHPublicKey".into(), Value::from(""));
    m.insert("SSHPrivateKey".into(), Value::from(""));
    m.insert("SSHPrivateKeyFile".into(), Value::from(""));
    m.insert("SSHAgentAuth".into(), Value::from(false));
    m.insert("WinRMPassword".into(), Value::from(""));
    for (k, v) in generated {
        m.insert(k.clone(), v.clone());
    }
    m
}

impl Hook {
    /// Runs hook `name` (normally [`HOOK_PROVISION`]): Packer's provisioners
    /// reach the machine through `comm`. If the build is cancelled meanwhile,
    /// `Hook.Cancel` is sent and the provisioners stop.
    pub async fn run(
        &self,
        name: &str,
        data: &Map<String, Value>,
        comm: Arc<dyn Communicator>,
    ) -> Result<(), BuildError> {
        let id = self.broker.next_id();
        let broker = self.broker.clone();
        let ui = self.client.clone();
        let server = tokio::spawn(async move {
            match broker
                .accept_timeout(id, std::time::Duration::from_secs(60))
                .await
            {
                Ok(st) => {
                    let handler = super::server::hook_stream_handler(broker.clone(), ui, comm);
                    rpc::serve(st, "hook", handler).await;
                }
                Err(e) => tracing::error!("hook {id}: {e}"),
            }
        });
        let arg = rpc::map([
            ("Name", Mp::from(name)),
            ("Data", json_to_mp(&Value::Object(data.clone()))),
            ("StreamId", Mp::from(id)),
        ]);
        let call = self.client.call("Hook.Run", arg);
        tokio::pin!(call);
        let res = tokio::select! {
            r = &mut call => r,
            _ = self.cancel.cancelled() => {
                let c = self.client.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.call("Hook.Cancel", Mp::Nil).await {
                        tracing::warn!("Hook.Cancel: {e}");
                    }
                });
                call.await
            }
        };
        server.abort();
        res.map(|_| ()).map_err(|e| e.to_string().into())
    }
}
