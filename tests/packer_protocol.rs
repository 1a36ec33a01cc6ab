//! Drives the plugin binary the way modern Packer (≥ 1.12, `--protobuf`,
//! 4-field handshake) would, with a fake core built from the library's own
//! yamux/broker/rpc pieces in client mode. Also: describe, cookie refusal,
//! and captured broker bytes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nspawn::packer::broker::Broker;
use nspawn::packer::launch::{COOKIE_KEY, COOKIE_VALUE};
use nspawn::packer::rpc::{self, field, BoxFuture, Client, Handler};
use nspawn::packer::yamux::Session;
use nspawn::packer::{gob, hosttest, proto};
use rmpv::Value as Mp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_packer-plugin-nspawn");

#[test]
fn describe_prints_json() {
    let out = Command::new(BIN)
        .arg("describe")
        .env_remove(COOKIE_KEY)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["api_version"], "x5.0");
    assert_eq!(v["protocol_version"], "v2");
    assert!(v["builders"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b == "hosttest"));
}

#[test]
fn refuses_to_run_by_hand() {
    let out = Command::new(BIN).env_remove(COOKIE_KEY).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Packer runs it for you"), "{err}");
}

#[test]
fn captured_broker_bytes_are_little_endian_ids() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/docs/packer-transcripts/captures");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("SKIP: captures not found");
        return;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("transcript.jsonl")) else {
            continue;
        };
        for line in text.lines() {
            let j: serde_json::Value = serde_json::from_str(line).unwrap();
            if j["kind"] == "broker" {
                let b = hex::decode(j["hex"].as_str().unwrap()).unwrap();
                let id = u32::from_le_bytes(b.try_into().unwrap());
                assert_eq!(id as u64, j["broker"].as_u64().unwrap(), "{line}");
                n += 1;
            }
        }
    }
    assert!(n > 50, "only {n} broker handshakes");
}

type Log = Arc<Mutex<Vec<String>>>;

fn core_ui_hook_handler(broker: Broker, log: Log) -> Handler {
    Arc::new(move |method: String, body: Mp| {
        let broker = broker.clone();
        let log = log.clone();
        Box::pin(async move {
            match method.as_str() {
                "Ui.Say" | "Ui.Message" | "Ui.Error" => {
                    log.lock().unwrap().push(format!(
                        "{method}: {}",
                        rpc::as_string(&body).unwrap_or_default()
                    ));
                    Ok(Mp::Nil)
                }
                "Ui.Machine" => Ok(Mp::Nil),
                "Ui.Ask" => Ok(Mp::from(format!(
                    "answer to {}",
                    rpc::as_string(&body).unwrap_or_default()
                ))),
                "Ui.NewTrackProgress" => Ok(Mp::from("coreTracker")),
                "UicoreTracker.Add" | "UicoreTracker.Close" => {
                    log.lock().unwrap().push(method.clone());
                    Ok(Mp::Nil)
                }
                "Hook.Run" => {
                    let sid = rpc::field_u64(&body, "StreamId") as u32;
                    assert_eq!(rpc::field_str(&body, "Name"), "packer_provision");
                    let data = field(&body, "Data").unwrap();
                    assert_eq!(rpc::field_str(data, "ID"), "hosttest");
                    let st = broker.dial(sid).await.map_err(|e| e.to_string())?;
                    let c = Client::new(st, "fake core hook");
                    provision(&broker, &c, &log).await;
                    c.close().await;
                    Ok(Mp::Nil)
                }
                other => Err(rpc::unknown_method(other)),
            }
        }) as BoxFuture<'static, _>
    })
}

/// What a provisioner does through the plugin's Communicator and Ui.
async fn provision(broker: &Broker, c: &Client, log: &Log) {
    c.call("Ui.Say", Mp::from("from-provisioner"))
        .await
        .unwrap();
    let answer = c.call("Ui.Ask", Mp::from("q?")).await.unwrap();
    assert_eq!(answer, Mp::from("answer to q?"));
    // progress forwarding: tracker id is the plugin's, calls reach our tracker
    let tid = c
        .call(
            "Ui.NewTrackProgress",
            rpc::map([
                ("Src", Mp::from("f.txt")),
                ("TotalSize", Mp::from(4)),
                ("CurrentSize", Mp::from(0)),
            ]),
        )
        .await
        .unwrap();
    let tid = rpc::as_string(&tid).unwrap();
    c.call(&format!("Ui{tid}.Add"), Mp::from(4)).await.unwrap();
    c.call(&format!("Ui{tid}.Close"), Mp::Nil).await.unwrap();
    // Start with stdout and the gob response stream (ids in the core's namespace)
    let (b2, b3) = (broker.clone(), broker.clone());
    let out = tokio::spawn(async move {
        let mut s = b2.accept(11).await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    });
    let resp = tokio::spawn(async move {
        let mut s = b3.accept(12).await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    });
    c.call(
        "Communicator.Start",
        rpc::map([
            ("Command", Mp::from("echo hi-from-cmd; exit 5")),
            ("StdinStreamId", Mp::from(0)),
            ("StdoutStreamId", Mp::from(11)),
            ("StderrStreamId", Mp::from(0)),
            ("ResponseStreamId", Mp::from(12)),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(out.await.unwrap(), b"hi-from-cmd\n");
    assert_eq!(resp.await.unwrap(), gob::command_finished(5));
    // stdin flows core -> plugin -> command
    let (b6, b7, b8) = (broker.clone(), broker.clone(), broker.clone());
    let stdin = tokio::spawn(async move {
        let mut s = b6.accept(21).await.unwrap();
        s.write_all(b"from-stdin").await.unwrap();
        s.shutdown().await.unwrap();
    });
    let out = tokio::spawn(async move {
        let mut s = b7.accept(22).await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    });
    let resp = tokio::spawn(async move {
        let mut s = b8.accept(23).await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    });
    c.call(
        "Communicator.Start",
        rpc::map([
            ("Command", Mp::from("cat")),
            ("StdinStreamId", Mp::from(21)),
            ("StdoutStreamId", Mp::from(22)),
            ("StderrStreamId", Mp::from(0)),
            ("ResponseStreamId", Mp::from(23)),
        ]),
    )
    .await
    .unwrap();
    stdin.await.unwrap();
    assert_eq!(out.await.unwrap(), b"from-stdin");
    assert_eq!(resp.await.unwrap(), gob::command_finished(0));
    // Upload with a FileInfo (mode 0600, time as msgpack ext -1)
    let b4 = broker.clone();
    let up = tokio::spawn(async move {
        let mut s = b4.accept(13).await.unwrap();
        s.write_all(b"data").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    c.call(
        "Communicator.Upload",
        rpc::map([
            ("Path", Mp::from("uploaded.txt")),
            ("ReaderStreamId", Mp::from(13)),
            (
                "FileInfo",
                rpc::map([
                    ("N", Mp::from("f.txt")),
                    ("S", Mp::from(4)),
                    ("M", Mp::from(0o600)),
                    ("T", Mp::Ext(-1, hex::decode("630488586b024b2c").unwrap())),
                ]),
            ),
        ]),
    )
    .await
    .unwrap();
    up.await.unwrap();
    // Download it back
    let b5 = broker.clone();
    let down = tokio::spawn(async move {
        let mut s = b5.accept(14).await.unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    });
    c.call(
        "Communicator.Download",
        rpc::map([
            ("Path", Mp::from("uploaded.txt")),
            ("WriterStreamId", Mp::from(14)),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(down.await.unwrap(), b"data");
    // protocol fault: unknown method gets an error, the stream keeps working
    let e = c.call("Communicator.Nope", Mp::Nil).await.unwrap_err();
    assert_eq!(e.to_string(), "rpc: can't find method Communicator.Nope");
    log.lock().unwrap().push("provisioned".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_protobuf_session_end_to_end() {
    let scratch = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["start", "builder", "--protobuf", "hosttest"])
        .env(COOKIE_KEY, COOKIE_VALUE)
        .env_remove("PACKER_PLUGIN_NSPAWN_PROTO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        BufReader::new(std::fs::File::from(stdout.into_owned_fd().unwrap()))
            .read_line(&mut l)
            .unwrap();
        l
    })
    .await
    .unwrap();
    let parts: Vec<&str> = line.trim().splitn(4, '|').collect();
    assert_eq!(&parts[..3], &["5", "0", "unix"], "{line}");
    let conn = tokio::net::UnixStream::connect(parts[3]).await.unwrap();
    let (r, w) = conn.into_split();
    let (session, incoming, _done) = Session::start(r, w, false, true);
    let broker = Broker::new(session.clone(), incoming);
    let main = broker.dial(0).await.unwrap();
    let c = Client::new(main, "fake core builder");

    // ConfigSpec as protobuf
    let spec = c.call("Builder.ConfigSpec", Mp::Nil).await.unwrap();
    let Some(Mp::Binary(bytes)) = field(&spec, "ConfigSpec") else {
        panic!("no ConfigSpec bin: {spec}");
    };
    let want = proto::object(&hosttest::factory().config_spec().with_packer_common());
    assert_eq!(bytes, &want);

    // Prepare, HCL style: string map + cty JSON
    let cty = serde_json::json!({
        "value": {"scratch_dir": scratch.path(), "message": "m", "count": 3, "verbose": null,
                  "tags": ["a"], "labels": null, "extra": {"note": "n"}, "mode": null,
                  "sleep_seconds": null, "packer_build_name": null},
        "type": ["object", {}]
    });
    let prep = c
        .call(
            "Builder.Prepare",
            rpc::map([(
                "Configs",
                Mp::Array(vec![
                    rpc::map([
                        ("packer_build_name", Mp::from("x")),
                        ("packer_builder_type", Mp::from("hosttest")),
                        ("packer_debug", Mp::from("false")),
                        ("packer_force", Mp::from("false")),
                        ("packer_on_error", Mp::from("")),
                    ]),
                    Mp::Binary(serde_json::to_vec(&cty).unwrap()),
                ]),
            )]),
        )
        .await
        .unwrap();
    assert_eq!(field(&prep, "Error"), Some(&Mp::Nil), "{prep}");
    assert_eq!(
        rpc::string_list(field(&prep, "GeneratedVars")),
        vec!["HostTestScratch"]
    );

    // Run: we serve Ui + Hook on our id 1
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    {
        let broker = broker.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let st = broker.accept(1).await.unwrap();
            rpc::serve(
                st,
                "fake core ui/hook",
                core_ui_hook_handler(broker.clone(), log),
            )
            .await;
        });
    }
    let aid = tokio::time::timeout(
        Duration::from_secs(30),
        c.call("Builder.Run", Mp::from(1u32)),
    )
    .await
    .expect("Run finished")
    .unwrap();
    let aid = aid.as_u64().unwrap() as u32;
    assert_ne!(aid, 0);
    let log = log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l == "Ui.Message: hosttest: message=m count=3 verbose=<unset> tags=a labels= extra.note=n"), "{log:?}");
    assert!(
        log.iter().any(|l| l == "Ui.Say: from-provisioner"),
        "{log:?}"
    );
    assert!(log.contains(&"UicoreTracker.Add".to_string()), "{log:?}");
    assert!(log.contains(&"UicoreTracker.Close".to_string()), "{log:?}");
    assert!(log.contains(&"provisioned".to_string()), "{log:?}");
    let up = scratch.path().join("uploaded.txt");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&up).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Artifact
    let ast = broker.dial(aid).await.unwrap();
    let a = Client::new(ast, "fake core artifact");
    assert_eq!(
        a.call("Artifact.BuilderId", Mp::Nil).await.unwrap(),
        Mp::from(hosttest::BUILDER_ID)
    );
    let files = rpc::string_list(Some(&a.call("Artifact.Files", Mp::Nil).await.unwrap()));
    assert_eq!(
        files,
        vec![scratch.path().join("artifact.txt").display().to_string()]
    );
    let st = a
        .call("Artifact.State", Mp::from("generated_data"))
        .await
        .unwrap();
    assert_eq!(
        rpc::field_str(&st, "HostTestScratch"),
        scratch.path().display().to_string()
    );
    assert_eq!(
        a.call("Artifact.State", Mp::from("nope")).await.unwrap(),
        Mp::Nil
    );
    a.call("Artifact.Destroy", Mp::Nil).await.unwrap();
    assert!(!scratch.path().join("artifact.txt").exists());
    let e = a.call("Artifact.Destroy", Mp::Nil).await.unwrap_err();
    assert!(e.to_string().contains("artifact.txt"), "{e}");

    // Unknown builder method: an error, not a hang
    let e = c.call("Builder.Nope", Mp::Nil).await.unwrap_err();
    assert_eq!(e.to_string(), "rpc: can't find method Builder.Nope");

    // Packer going away ends the plugin
    session.close();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("plugin exits when the session ends")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Starts the plugin, reads its handshake line and connects a fake core.
async fn connect(
    arg0: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (tokio::process::Child, Vec<String>, Client, Session) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg0(arg0)
        .args(args)
        .env(COOKIE_KEY, COOKIE_VALUE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut l = String::new();
        BufReader::new(std::fs::File::from(stdout.into_owned_fd().unwrap()))
            .read_line(&mut l)
            .unwrap();
        l
    })
    .await
    .unwrap();
    let parts: Vec<String> = line.trim().split('|').map(str::to_string).collect();
    let conn = tokio::net::UnixStream::connect(parts.last().unwrap())
        .await
        .unwrap();
    let (r, w) = conn.into_split();
    let (session, incoming, _done) = Session::start(r, w, false, true);
    let broker = Broker::new(session.clone(), incoming);
    let c = Client::new(broker.dial(0).await.unwrap(), "fake core");
    (child, parts, c, session)
}

async fn config_spec_bytes(c: &Client) -> Vec<u8> {
    let v = c.call("Builder.ConfigSpec", Mp::Nil).await.unwrap();
    match field(&v, "ConfigSpec") {
        Some(Mp::Binary(b)) => b.clone(),
        _ => panic!("no ConfigSpec in {v}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_modern_gob_launches() {
    let spec = hosttest::factory().config_spec().with_packer_common();

    // Packer 1.6.6 style: no arguments, argv[0] packer-builder-hosttest, 3 fields, Debian gob name
    let (mut child, parts, c, session) = connect(
        "packer-builder-hosttest",
        &[],
        &[
            ("PACKER_PLUGIN_NSPAWN_PROTO", "legacy"),
            ("PACKER_PLUGIN_NSPAWN_OBJSPEC", "debian"),
        ],
    )
    .await;
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(&parts[..2], &["5", "unix"]);
    assert_eq!(
        config_spec_bytes(&c).await,
        gob::object_spec(&spec, gob::OBJSPEC_NAME_DEBIAN)
    );
    session.close();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();

    // Packer 1.7 … 1.11 style: start builder NAME, 4 fields, module gob name
    let (mut child, parts, c, session) = connect(
        "packer-plugin-nspawn",
        &["start", "builder", "hosttest"],
        &[
            ("PACKER_PLUGIN_NSPAWN_PROTO", "modern"),
            ("PACKER_PLUGIN_NSPAWN_OBJSPEC", "module"),
        ],
    )
    .await;
    assert_eq!(&parts[..3], &["5", "0", "unix"], "{parts:?}");
    assert_eq!(
        config_spec_bytes(&c).await,
        gob::object_spec(&spec, gob::OBJSPEC_NAME_MODULE)
    );
    session.close();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
}
