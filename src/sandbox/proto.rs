//! The parent ↔ helper protocol on the `SOCK_SEQPACKET` sync socket. One message per
//! packet; text so that a trace is readable.
//!
//! ```text
//! parent → helper   SPEC <json ChildSpec>
//! helper → parent   UNSHARED                (namespaces exist; maps may be written)
//! parent → helper   GO                      (uid/gid maps written, or none needed)
//! init   → parent   EXIT <code> | SIGNAL <n>
//! any    → parent   ERROR <what failed, with subject and errno>
//! ```
//! The parent reads until end of file: the helper, the init and the command (before
//! its exec) all hold the socket, so EOF means the whole sandbox is gone.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest message accepted (the spec carries the environment and argv).
pub const MAX_MSG: usize = 1 << 20;

/// What the helper needs to know, sent as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    pub root: PathBuf,
    pub userns: bool,
    pub hostname: Option<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub bind_ro: Vec<(PathBuf, PathBuf)>,
    pub network: bool,
    pub argv: Vec<String>,
    /// Enter mode: join the namespaces of this running process (a booted machine's
    /// leader) instead of creating new ones; `root` is then its `/proc/PID/root`.
    #[serde(default)]
    pub enter: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Spec(String),
    Unshared,
    Go,
    Exit(i32),
    Signal(i32),
    Error(String),
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Spec(j) => format!("SPEC {j}"),
            Msg::Unshared => "UNSHARED".into(),
            Msg::Go => "GO".into(),
            Msg::Exit(c) => format!("EXIT {c}"),
            Msg::Signal(s) => format!("SIGNAL {s}"),
            Msg::Error(e) => format!("ERROR {e}"),
        }
        .into_bytes()
    }

    pub fn decode(b: &[u8]) -> Result<Msg, String> {
        let s = std::str::from_utf8(b).map_err(|_| "message is not UTF-8".to_string())?;
        let (word, rest) = s.split_once(' ').unwrap_or((s, ""));
        let num = |r: &str| {
            r.parse::<i32>()
                .map_err(|_| format!("bad number in message {s:?}"))
        };
        Ok(match word {
            "SPEC" => Msg::Spec(rest.to_string()),
            "UNSHARED" => Msg::Unshared,
            "GO" => Msg::Go,
            "EXIT" => Msg::Exit(num(rest)?),
            "SIGNAL" => Msg::Signal(num(rest)?),
            "ERROR" => Msg::Error(rest.to_string()),
            _ => return Err(format!("unknown message {s:?}")),
        })
    }
}

/// Sends one message. Errors are returned as errno.
pub fn send(fd: &OwnedFd, msg: &Msg) -> nix::Result<()> {
    let b = msg.encode();
    let n = crate::sys::send_packet(fd, &b)?;
    if n != b.len() {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    Ok(())
}

/// Receives one message; `Ok(None)` at end of file.
pub fn recv(fd: &OwnedFd) -> Result<Option<Msg>, String> {
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => return Msg::decode(&buf[..n]).map(Some),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("read sync socket: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Msg::Spec("{\"a\":1}".into()),
            Msg::Unshared,
            Msg::Go,
            Msg::Exit(3),
            Msg::Signal(9),
            Msg::Error("mount proc on /x/proc: EPERM".into()),
        ] {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
        assert!(Msg::decode(b"EXIT x").is_err());
        assert!(Msg::decode(b"HELLO").is_err());
    }
}
