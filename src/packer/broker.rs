//! The MuxBroker: names yamux streams with little-endian `u32` broker ids.
//!
//! Dial(id) opens a stream, writes the id and waits for the same 4 bytes
//! back. Incoming streams are parked under the id they announce until
//! `accept(id)` takes them (and echoes the id). Ids in the namespace of the
//! side that accepts them; ours start at 1 (`next_id`). Parked streams nobody
//! accepts within 5 s are dropped, as Go's broker does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::yamux::{Incoming, Session, Stream};

/// How long either side waits for the other in a broker handshake.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the MuxBroker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: dialing stream id {id}: {source}")]
    Dial {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("broker: dialing stream id {id}: bad ack {ack}")]
    BadAck { id: u32, ack: u32 },
    #[error("broker: timeout waiting for accept of stream id {0}")]
    AcceptTimeout(u32),
    #[error("broker: acknowledging stream id {id}: {source}")]
    Ack {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("broker: yamux session closed")]
    Closed,
}

#[derive(Default)]
struct Pending {
    parked: HashMap<u32, Stream>,
    waiters: HashMap<u32, oneshot::Sender<Stream>>,
}

/// The broker over one yamux session.
#[derive(Clone)]
pub struct Broker {
    session: Session,
    next: Arc<AtomicU32>,
    pending: Arc<Mutex<Pending>>,
}

impl Broker {
    /// Starts the accept loop on the session's incoming streams.
    pub fn new(session: Session, mut incoming: Incoming) -> Broker {
        let b = Broker {
            session,
            next: Arc::new(AtomicU32::new(0)),
            pending: Arc::new(Mutex::new(Pending::default())),
        };
        let bb = b.clone();
        tokio::spawn(async move {
            while let Some(mut st) = incoming.accept().await {
                let bb = bb.clone();
                tokio::spawn(async move {
                    let mut idb = [0u8; 4];
                    match tokio::time::timeout(BROKER_TIMEOUT, st.read_exact(&mut idb)).await {
                        Ok(Ok(_)) => bb.park(u32::from_le_bytes(idb), st),
                        Ok(Err(e)) => {
                            tracing::warn!("broker: reading id of stream {}: {e}", st.id())
                        }
                        Err(_) => tracing::warn!("broker: no id on stream {} within 5 s", st.id()),
                    }
                });
            }
            // Session over: fail all waiters.
            let mut p = bb.pending.lock().unwrap();
            p.waiters.clear();
            p.parked.clear();
        });
        b
    }

    fn park(&self, id: u32, st: Stream) {
        let mut p = self.pending.lock().unwrap();
        if let Some(tx) = p.waiters.remove(&id) {
            if let Err(st) = tx.send(st) {
                p.parked.insert(id, st);
            } else {
                return;
            }
        } else {
            p.parked.insert(id, st);
        }
        drop(p);
        let pending = self.pending.clone();
        tokio::spawn(async move {
            tokio::time::sleep(BROKER_TIMEOUT).await;
            if pending.lock().unwrap().parked.remove(&id).is_some() {
                tracing::warn!("broker: stream for id {id} was not accepted within 5 s; dropped");
            }
        });
    }

    /// A fresh id in our namespace (1, 2, …).
    pub fn next_id(&self) -> u32 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Waits up to `timeout` for the peer to dial `id`, then acknowledges it.
    pub async fn accept_timeout(&self, id: u32, timeout: Duration) -> Result<Stream, BrokerError> {
        let parked = self.pending.lock().unwrap().parked.remove(&id);
        if let Some(st) = parked {
            return Self::ack(id, st).await;
        }
        let rx = {
            let mut p = self.pending.lock().unwrap();
            // it may have arrived in between
            if let Some(st) = p.parked.remove(&id) {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(st);
                rx
            } else {
                let (tx, rx) = oneshot::channel();
                p.waiters.insert(id, tx);
                rx
            }
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(st)) => Self::ack(id, st).await,
            Ok(Err(_)) => Err(BrokerError::Closed),
            Err(_) => {
                self.pending.lock().unwrap().waiters.remove(&id);
                Err(BrokerError::AcceptTimeout(id))
            }
        }
    }

    /// Accept with Go's 5 s timeout.
    pub async fn accept(&self, id: u32) -> Result<Stream, BrokerError> {
        self.accept_timeout(id, BROKER_TIMEOUT).await
    }

    async fn ack(id: u32, mut st: Stream) -> Result<Stream, BrokerError> {
        st.write_all(&id.to_le_bytes())
            .await
            .map_err(|source| BrokerError::Ack { id, source })?;
        Ok(st)
    }

    /// Dials the peer's id `id`.
    pub async fn dial(&self, id: u32) -> Result<Stream, BrokerError> {
        let mut st = self.session.open().map_err(|_| BrokerError::Closed)?;
        let fut = async {
            st.write_all(&id.to_le_bytes()).await?;
            let mut ack = [0u8; 4];
            st.read_exact(&mut ack).await?;
            Ok::<u32, std::io::Error>(u32::from_le_bytes(ack))
        };
        match tokio::time::timeout(BROKER_TIMEOUT, fut).await {
            Ok(Ok(ack)) if ack == id => Ok(st),
            Ok(Ok(ack)) => Err(BrokerError::BadAck { id, ack }),
            Ok(Err(source)) => Err(BrokerError::Dial { id, source }),
            Err(_) => Err(BrokerError::Dial {
                id,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "no ack within 5 s"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Broker, Broker) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        let (s1, i1, _) = Session::start(ar, aw, true, false);
        let (s2, i2, _) = Session::start(br, bw, false, false);
        (Broker::new(s1, i1), Broker::new(s2, i2))
    }

    #[tokio::test]
    async fn dial_accept_both_orders_and_ids() {
        let (plugin, core) = pair();
        assert_eq!(plugin.next_id(), 1);
        assert_eq!(plugin.next_id(), 2);
        // accept first, then dial
        let acc = {
            let p = plugin.clone();
            tokio::spawn(async move { p.accept(7).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut c = core.dial(7).await.unwrap();
        let mut s = acc.await.unwrap().unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hi");
        // dial first (parked), then accept
        let d = {
            let c2 = core.clone();
            tokio::spawn(async move { c2.dial(0).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _s0 = plugin.accept(0).await.unwrap();
        d.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn broker_bytes_are_little_endian() {
        let (plugin, core) = pair();
        let acc = {
            let p = plugin.clone();
            tokio::spawn(async move {
                let mut st = p.accept(0x0102_0304).await.unwrap();
                let mut b = [0u8; 1];
                st.read_exact(&mut b).await.unwrap();
            })
        };
        // raw dial by hand on the core side
        let mut st = core.session().open().unwrap();
        st.write_all(&[4, 3, 2, 1]).await.unwrap();
        let mut ack = [0u8; 4];
        st.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [4, 3, 2, 1]);
        st.write_all(b"x").await.unwrap();
        acc.await.unwrap();
    }

    #[tokio::test]
    async fn accept_times_out() {
        let (plugin, _core) = pair();
        let e = plugin
            .accept_timeout(9, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::AcceptTimeout(9)));
    }
}
