//! The RPC services the plugin serves: `Builder` (broker id 0), the
//! `Ui` + `Communicator` pair on each hook stream, and `Artifact`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rmpv::Value as Mp;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::api::{Artifact, Builder, Communicator, Hook, RemoteCmd, RunContext, Ui};
use super::broker::Broker;
use super::config::{self, json_to_mp};
use super::rpc::{self, field, field_str, field_u64, BoxFuture, Client, Handler};
use super::{gob, proto};

/// How the ConfigSpec is encoded for this Packer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecEncoding {
    /// gob, naming nested ObjectSpecs with the given Go type name.
    Gob { objspec_name: String },
    /// protobuf (`--protobuf`).
    Protobuf,
}

struct BuilderService {
    builder: Arc<dyn Builder>,
    broker: Broker,
    encoding: SpecEncoding,
    cancel: Mutex<CancellationToken>,
}

/// The handler for the main `Builder` RPC stream.
pub fn builder_handler(
    builder: Arc<dyn Builder>,
    broker: Broker,
    encoding: SpecEncoding,
) -> Handler {
    let svc = Arc::new(BuilderService {
        builder,
        broker,
        encoding,
        cancel: Mutex::new(CancellationToken::new()),
    });
    Arc::new(move |method: String, body: Mp| {
        let svc = svc.clone();
        Box::pin(async move { svc.call(&method, body).await }) as BoxFuture<'static, _>
    })
}

impl BuilderService {
    async fn call(&self, method: &str, body: Mp) -> Result<Mp, String> {
        match method {
            "Builder.ConfigSpec" => {
                let spec = self.builder.config_spec().with_packer_common();
                let bytes = match &self.encoding {
                    SpecEncoding::Gob { objspec_name } => gob::object_spec(&spec, objspec_name),
                    SpecEncoding::Protobuf => proto::object(&spec),
                };
                Ok(rpc::map([("ConfigSpec", Mp::Binary(bytes))]))
            }
            "Builder.Prepare" => {
                let raws = match field(&body, "Configs") {
                    Some(Mp::Array(a)) => a.clone(),
                    Some(Mp::Nil) | None => Vec::new(),
                    Some(other) => {
                        let e = format!("Builder.Prepare: Configs is not a list: {other}");
                        tracing::error!("{e}");
                        return Err(e);
                    }
                };
                let spec = self.builder.config_spec().with_packer_common();
                let res = config::from_raws(&raws, &spec).and_then(|cfg| self.builder.prepare(cfg));
                let list = |v: &Vec<String>| {
                    if v.is_empty() {
                        Mp::Nil
                    } else {
                        Mp::Array(v.iter().map(|s| Mp::from(s.as_str())).collect())
                    }
                };
                Ok(match res {
                    Ok(p) => rpc::map([
                        ("GeneratedVars", list(&p.generated_vars)),
                        ("Warnings", list(&p.warnings)),
                        ("Error", Mp::Nil),
                    ]),
                    Err(errs) => rpc::map([
                        ("GeneratedVars", Mp::Nil),
                        ("Warnings", Mp::Nil),
                        (
                            "Error",
                            rpc::map([("Message", Mp::from(config::multierror(&errs)))]),
                        ),
                    ]),
                })
            }
            "Builder.Run" => {
                let id = body
                    .as_u64()
                    .ok_or_else(|| format!("Builder.Run: argument is not a stream id: {body}"))?;
                let stream = self.broker.dial(id as u32).await.map_err(|e| {
                    tracing::error!("Builder.Run: {e}");
                    e.to_string()
                })?;
                let client = Client::new(stream, "Builder.Run ui/hook");
                let token = CancellationToken::new();
                *self.cancel.lock().unwrap() = token.clone();
                let ctx = RunContext {
                    ui: Ui::new(client.clone()),
                    hook: Hook {
                        client: client.clone(),
                        broker: self.broker.clone(),
                        cancel: token.clone(),
                    },
                    cancel: token,
                };
                let res = self.builder.run(ctx).await;
                let reply = match res {
                    Ok(Some(artifact)) => {
                        let aid = self.broker.next_id();
                        serve_artifact(self.broker.clone(), aid, Arc::new(artifact));
                        Ok(Mp::from(aid))
                    }
                    Ok(None) => Ok(Mp::from(0u32)),
                    Err(e) => Err(e.to_string()),
                };
                client.close().await;
                reply
            }
            "Builder.Cancel" => {
                tracing::info!("Builder.Cancel received; cancelling the build");
                self.cancel.lock().unwrap().cancel();
                self.builder.cancel();
                Ok(Mp::Nil)
            }
            other => {
                tracing::error!("Builder service: unknown method {other} (body {body})");
                Err(rpc::unknown_method(other))
            }
        }
    }
}

/// Serves `Artifact.*` on broker id `aid` (accepting again if Packer re-dials).
fn serve_artifact(broker: Broker, aid: u32, art: Arc<Artifact>) {
    tokio::spawn(async move {
        loop {
            let st = match broker
                .accept_timeout(aid, Duration::from_secs(24 * 3600))
                .await
            {
                Ok(st) => st,
                Err(e) => {
                    tracing::debug!("artifact {aid}: {e}");
                    return;
                }
            };
            let art = art.clone();
            let handler: Handler = Arc::new(move |method: String, body: Mp| {
                let art = art.clone();
                Box::pin(async move { artifact_call(&art, &method, body).await })
                    as BoxFuture<'static, _>
            });
            tokio::spawn(rpc::serve(st, "artifact", handler));
        }
    });
}

async fn artifact_call(art: &Artifact, method: &str, body: Mp) -> Result<Mp, String> {
    match method {
        "Artifact.BuilderId" => Ok(Mp::from(art.builder_id.as_str())),
        "Artifact.Files" => Ok(Mp::Array(
            art.files.iter().map(|f| Mp::from(f.as_str())).collect(),
        )),
        "Artifact.Id" => Ok(Mp::from(art.id.as_str())),
        "Artifact.String" => Ok(Mp::from(art.description.as_str())),
        "Artifact.State" => {
            let key = rpc::as_string(&body).unwrap_or_default();
            Ok(art.state.get(&key).map(json_to_mp).unwrap_or(Mp::Nil))
        }
        "Artifact.Destroy" => match &art.destroy {
            Some(d) => {
                let d = d.clone();
                tokio::task::spawn_blocking(move || d())
                    .await
                    .map_err(|e| format!("Artifact.Destroy: {e}"))?
                    .map(|_| Mp::Nil)
            }
            None => Ok(Mp::Nil),
        },
        other => {
            tracing::error!("Artifact service: unknown method {other}");
            Err(rpc::unknown_method(other))
        }
    }
}

fn random_suffix() -> String {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut r = rand::thread_rng();
    (0..6)
        .map(|_| ALNUM[r.gen_range(0..ALNUM.len())] as char)
        .collect()
}

struct HookStream {
    broker: Broker,
    ui: Client,
    comm: Arc<dyn Communicator>,
    trackers: Mutex<HashMap<String, String>>,
}

/// The handler Packer calls on a hook stream: its Ui calls are forwarded to
/// Packer's Ui, and `Communicator.*` reach the builder's communicator.
pub fn hook_stream_handler(broker: Broker, ui: Client, comm: Arc<dyn Communicator>) -> Handler {
    let hs = Arc::new(HookStream {
        broker,
        ui,
        comm,
        trackers: Mutex::new(HashMap::new()),
    });
    Arc::new(move |method: String, body: Mp| {
        let hs = hs.clone();
        Box::pin(async move { hs.call(&method, body).await }) as BoxFuture<'static, _>
    })
}

fn io_err(what: &str, e: impl std::fmt::Display) -> String {
    let s = format!("{what}: {e}");
    tracing::error!("{s}");
    s
}

impl HookStream {
    async fn call(&self, method: &str, body: Mp) -> Result<Mp, String> {
        match method {
            "Ui.Say" | "Ui.Message" | "Ui.Error" | "Ui.Machine" | "Ui.Ask" => {
                self.ui.call(method, body).await.map_err(|e| e.to_string())
            }
            "Ui.NewTrackProgress" => {
                let up = self
                    .ui
                    .call(method, body.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let up = rpc::as_string(&up).unwrap_or_default();
                let mine = format!(
                    "{}{}",
                    field_str(&body, "Src").replace('.', "_"),
                    random_suffix()
                );
                self.trackers.lock().unwrap().insert(mine.clone(), up);
                Ok(Mp::from(mine))
            }
            "Communicator.Start" => self.start(body).await,
            "Communicator.Upload" => {
                let path = field_str(&body, "Path");
                let sid = field_u64(&body, "ReaderStreamId") as u32;
                let mode = field(&body, "FileInfo")
                    .and_then(|fi| field(fi, "M"))
                    .and_then(|m| m.as_u64())
                    .map(|m| (m & 0o7777) as u32);
                let st = self
                    .broker
                    .dial(sid)
                    .await
                    .map_err(|e| io_err(&format!("Communicator.Upload {path}"), e))?;
                let (r, mut w) = tokio::io::split(st);
                self.comm
                    .upload(path.clone(), Box::new(r), mode)
                    .await
                    .map_err(|e| io_err(&format!("upload to {path}"), e))?;
                let _ = w.shutdown().await;
                Ok(Mp::Nil)
            }
            "Communicator.UploadDir" => {
                let (dst, src) = (field_str(&body, "Dst"), field_str(&body, "Src"));
                let ex = rpc::string_list(field(&body, "Exclude"));
                self.comm
                    .upload_dir(dst.clone(), PathBuf::from(&src), ex)
                    .await
                    .map_err(|e| io_err(&format!("upload of directory {src} to {dst}"), e))?;
                Ok(Mp::Nil)
            }
            "Communicator.Download" => {
                let path = field_str(&body, "Path");
                let sid = field_u64(&body, "WriterStreamId") as u32;
                let st = self
                    .broker
                    .dial(sid)
                    .await
                    .map_err(|e| io_err(&format!("Communicator.Download {path}"), e))?;
                self.comm
                    .download(path.clone(), Box::new(st))
                    .await
                    .map_err(|e| io_err(&format!("download of {path}"), e))?;
                Ok(Mp::Nil)
            }
            "Communicator.DownloadDir" => {
                let (dst, src) = (field_str(&body, "Dst"), field_str(&body, "Src"));
                let ex = rpc::string_list(field(&body, "Exclude"));
                self.comm
                    .download_dir(src.clone(), PathBuf::from(&dst), ex)
                    .await
                    .map_err(|e| io_err(&format!("download of directory {src} to {dst}"), e))?;
                Ok(Mp::Nil)
            }
            m if m.starts_with("Ui") && (m.ends_with(".Add") || m.ends_with(".Close")) => {
                let (svc, op) = m.rsplit_once('.').unwrap();
                let mine = &svc[2..];
                let up = self.trackers.lock().unwrap().get(mine).cloned();
                let Some(up) = up else {
                    tracing::error!("hook stream: progress call for unknown tracker {mine:?}");
                    return Err(format!("rpc: can't find service {svc}"));
                };
                if op == "Close" {
                    self.trackers.lock().unwrap().remove(mine);
                }
                self.ui
                    .call(&format!("Ui{up}.{op}"), body)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => {
                tracing::error!("hook stream: unknown method {other} (body {body})");
                Err(rpc::unknown_method(other))
            }
        }
    }

    async fn start(&self, body: Mp) -> Result<Mp, String> {
        let command = field_str(&body, "Command");
        let id = |k: &str| field_u64(&body, k) as u32;
        let (inid, outid, errid, respid) = (
            id("StdinStreamId"),
            id("StdoutStreamId"),
            id("StderrStreamId"),
            id("ResponseStreamId"),
        );
        let what = format!("Communicator.Start {command:?}");
        let dial = |sid: u32| {
            let b = self.broker.clone();
            async move {
                if sid == 0 {
                    Ok(None)
                } else {
                    b.dial(sid).await.map(Some)
                }
            }
        };
        let stdin = dial(inid).await.map_err(|e| io_err(&what, e))?;
        let stdout = dial(outid).await.map_err(|e| io_err(&what, e))?;
        let stderr = dial(errid).await.map_err(|e| io_err(&what, e))?;
        let mut resp = dial(respid).await.map_err(|e| io_err(&what, e))?;
        let comm = self.comm.clone();
        tokio::spawn(async move {
            // Keep a handle on stderr to report a failure to start.
            let cmd = RemoteCmd {
                command: command.clone(),
                stdin: stdin.map(|s| Box::new(s) as _),
                stdout: stdout.map(|s| Box::new(s) as _),
                stderr: stderr.map(|s| Box::new(s) as _),
            };
            let status = match comm.start(cmd).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("running {command:?}: {e}");
                    1
                }
            };
            if let Some(r) = resp.as_mut() {
                if let Err(e) = r.write_all(&gob::command_finished(status as i64)).await {
                    tracing::error!("sending the exit status of {command:?}: {e}");
                }
                let _ = r.shutdown().await;
            }
        });
        Ok(Mp::Nil)
    }
}
