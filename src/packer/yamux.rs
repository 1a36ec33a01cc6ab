//! A small yamux session (hashicorp/yamux wire format) for the plugin side.
//!
//! The plugin is the yamux *server*: streams Packer opens have odd ids, ours
//! even ids. Frames are 12-byte big-endian headers plus, for DATA, a payload.
//! Both sides ping every 30 s; a ping unanswered for 10 s ends the session.
//! Each stream has a 256 KiB window per direction; we return credit once half
//! of it has been consumed.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};

/// Frame types.
pub const TYPE_DATA: u8 = 0;
pub const TYPE_WINDOW_UPDATE: u8 = 1;
pub const TYPE_PING: u8 = 2;
pub const TYPE_GO_AWAY: u8 = 3;
/// Frame flags.
pub const FLAG_SYN: u16 = 1;
pub const FLAG_ACK: u16 = 2;
pub const FLAG_FIN: u16 = 4;
pub const FLAG_RST: u16 = 8;

/// Initial (and maximum) window per stream and direction.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Largest DATA payload we send in one frame.
const MAX_FRAME_PAYLOAD: usize = 64 * 1024;
/// How often we ping, and how long we wait for the answer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A yamux frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub typ: u8,
    pub flags: u16,
    pub stream_id: u32,
    /// DATA: payload length; WINDOW_UPDATE: delta; PING: opaque; GO_AWAY: code.
    pub length: u32,
}

impl Header {
    pub fn new(typ: u8, flags: u16, stream_id: u32, length: u32) -> Self {
        Header {
            version: 0,
            typ,
            flags,
            stream_id,
            length,
        }
    }

    pub fn encode(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = self.version;
        b[1] = self.typ;
        b[2..4].copy_from_slice(&self.flags.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; 12]) -> Result<Self, YamuxError> {
        let h = Header {
            version: b[0],
            typ: b[1],
            flags: u16::from_be_bytes([b[2], b[3]]),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        };
        if h.version != 0 {
            return Err(YamuxError::BadFrame(format!(
                "unsupported yamux version {} in header {}",
                h.version,
                hex::encode(b)
            )));
        }
        if h.typ > TYPE_GO_AWAY {
            return Err(YamuxError::BadFrame(format!(
                "unknown yamux frame type {} in header {}",
                h.typ,
                hex::encode(b)
            )));
        }
        Ok(h)
    }
}

/// Errors of the yamux layer.
#[derive(Debug, thiserror::Error)]
pub enum YamuxError {
    #[error("yamux: bad frame: {0}")]
    BadFrame(String),
    #[error("yamux: reading frames from Packer: {0}")]
    Read(#[source] io::Error),
    #[error("yamux: keepalive: Packer did not answer a ping within {0:?}")]
    KeepaliveTimeout(Duration),
    #[error("yamux: session closed")]
    Closed,
}

#[derive(Default)]
struct StreamState {
    recv: VecDeque<u8>,
    /// Bytes read by the application that have not been credited back yet.
    consumed: u32,
    recv_fin: bool,
    reset: bool,
    send_window: u32,
    sent_fin: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl StreamState {
    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }
}

struct Inner {
    streams: Mutex<HashMap<u32, Arc<Mutex<StreamState>>>>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU32,
    closed: AtomicBool,
    pings: Mutex<HashMap<u32, oneshot::Sender<()>>>,
    ping_counter: AtomicU32,
}

impl Inner {
    fn send_frame(&self, h: Header, payload: &[u8]) {
        let mut v = Vec::with_capacity(12 + payload.len());
        v.extend_from_slice(&h.encode());
        v.extend_from_slice(payload);
        // A send error means the writer is gone: the session is over and the
        // stream operations notice through `closed`.
        let _ = self.out.send(v);
    }

    fn close_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let streams: Vec<_> = self.streams.lock().unwrap().drain().collect();
        for (_, st) in streams {
            let mut s = st.lock().unwrap();
            s.reset = true;
            s.wake_all();
        }
        self.pings.lock().unwrap().clear();
    }
}

/// A yamux session over one connection.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

/// Receives the streams Packer opens.
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<Stream>,
}

impl Incoming {
    /// The next stream Packer opened, or `None` once the session is over.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.rx.recv().await
    }
}

impl Session {
    /// Starts a session on `io` as the yamux server (even stream ids) or
    /// client (odd ids). Spawns the reader, writer and keepalive tasks.
    /// `done` fires when the session ends (EOF, error or keepalive timeout).
    pub fn start<R, W>(
        read: R,
        write: W,
        server: bool,
        keepalive: bool,
    ) -> (Session, Incoming, oneshot::Receiver<Option<YamuxError>>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (acc_tx, acc_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        let inner = Arc::new(Inner {
            streams: Mutex::new(HashMap::new()),
            out: out_tx,
            next_id: AtomicU32::new(if server { 2 } else { 1 }),
            closed: AtomicBool::new(false),
            pings: Mutex::new(HashMap::new()),
            ping_counter: AtomicU32::new(0),
        });
        let session = Session {
            inner: inner.clone(),
        };
        tokio::spawn(writer_task(write, out_rx));
        let done_tx = Arc::new(Mutex::new(Some(done_tx)));
        {
            let inner = inner.clone();
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let res = reader_task(read, inner.clone(), acc_tx).await;
                inner.close_all();
                if let Some(tx) = done_tx.lock().unwrap().take() {
                    let _ = tx.send(res.err());
                }
            });
        }
        if keepalive {
            let s = session.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                    if s.is_closed() {
                        return;
                    }
                    if s.ping(KEEPALIVE_TIMEOUT).await.is_err() {
                        if s.is_closed() {
                            return;
                        }
                        tracing::error!("yamux: keepalive ping unanswered; closing the session");
                        s.inner.close_all();
                        if let Some(tx) = done_tx.lock().unwrap().take() {
                            let _ = tx.send(Some(YamuxError::KeepaliveTimeout(KEEPALIVE_TIMEOUT)));
                        }
                        return;
                    }
                }
            });
        }
        (session, Incoming { rx: acc_rx }, done_rx)
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Sends a PING and waits for the ACK.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, YamuxError> {
        if self.is_closed() {
            return Err(YamuxError::Closed);
        }
        let id = self.inner.ping_counter.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.inner.pings.lock().unwrap().insert(id, tx);
        let start = std::time::Instant::now();
        self.inner
            .send_frame(Header::new(TYPE_PING, FLAG_SYN, 0, id), &[]);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(YamuxError::Closed),
            Err(_) => {
                self.inner.pings.lock().unwrap().remove(&id);
                Err(YamuxError::KeepaliveTimeout(timeout))
            }
        }
    }

    /// Opens a new stream (sends WINDOW_UPDATE+SYN with delta 0, as Go does).
    pub fn open(&self) -> Result<Stream, YamuxError> {
        if self.is_closed() {
            return Err(YamuxError::Closed);
        }
        let id = self.inner.next_id.fetch_add(2, Ordering::SeqCst);
        let st = Arc::new(Mutex::new(StreamState {
            send_window: INITIAL_WINDOW,
            ..Default::default()
        }));
        self.inner.streams.lock().unwrap().insert(id, st.clone());
        self.inner
            .send_frame(Header::new(TYPE_WINDOW_UPDATE, FLAG_SYN, id, 0), &[]);
        Ok(Stream {
            id,
            state: st,
            session: self.inner.clone(),
        })
    }

    /// Closes every stream; the reader ends when the connection does.
    pub fn close(&self) {
        self.inner
            .send_frame(Header::new(TYPE_GO_AWAY, 0, 0, 0), &[]);
        self.inner.close_all();
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(first) = rx.recv().await {
        let mut buf = first;
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(e) = w.write_all(&buf).await {
            tracing::debug!("yamux: write to Packer failed: {e}");
            return;
        }
        if let Err(e) = w.flush().await {
            tracing::debug!("yamux: flush to Packer failed: {e}");
            return;
        }
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut r: R,
    inner: Arc<Inner>,
    acc: mpsc::UnboundedSender<Stream>,
) -> Result<(), YamuxError> {
    let mut hb = [0u8; 12];
    loop {
        match r.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(YamuxError::Read(e)),
        }
        let h = Header::decode(&hb)?;
        let mut payload = Vec::new();
        if h.typ == TYPE_DATA && h.length > 0 {
            if h.length > 16 * 1024 * 1024 {
                return Err(YamuxError::BadFrame(format!(
                    "DATA frame of {} bytes on stream {}",
                    h.length, h.stream_id
                )));
            }
            payload = vec![0u8; h.length as usize];
            r.read_exact(&mut payload).await.map_err(YamuxError::Read)?;
        }
        match h.typ {
            TYPE_PING => {
                if h.flags & FLAG_SYN != 0 {
                    inner.send_frame(Header::new(TYPE_PING, FLAG_ACK, 0, h.length), &[]);
                } else if h.flags & FLAG_ACK != 0 {
                    if let Some(tx) = inner.pings.lock().unwrap().remove(&h.length) {
                        let _ = tx.send(());
                    }
                }
            }
            TYPE_GO_AWAY => {
                tracing::debug!("yamux: GO_AWAY code {}", h.length);
                return Ok(());
            }
            _ => handle_stream_frame(&inner, &acc, h, payload)?,
        }
    }
}

fn handle_stream_frame(
    inner: &Arc<Inner>,
    acc: &mpsc::UnboundedSender<Stream>,
    h: Header,
    payload: Vec<u8>,
) -> Result<(), YamuxError> {
    let id = h.stream_id;
    let existing = inner.streams.lock().unwrap().get(&id).cloned();
    let st = match existing {
        Some(st) => st,
        None if h.flags & FLAG_SYN != 0 => {
            let st = Arc::new(Mutex::new(StreamState {
                send_window: INITIAL_WINDOW,
                ..Default::default()
            }));
            inner.streams.lock().unwrap().insert(id, st.clone());
            // Acknowledge at once: newer hashicorp/yamux gives up on streams
            // that stay un-ACKed.
            inner.send_frame(Header::new(TYPE_WINDOW_UPDATE, FLAG_ACK, id, 0), &[]);
            let stream = Stream {
                id,
                state: st.clone(),
                session: inner.clone(),
            };
            if acc.send(stream).is_err() {
                return Err(YamuxError::Closed);
            }
            st
        }
        None => {
            // Late frame for a stream we already dropped: harmless.
            tracing::trace!("yamux: frame for unknown stream {id} ignored");
            return Ok(());
        }
    };
    let mut s = st.lock().unwrap();
    if h.typ == TYPE_WINDOW_UPDATE {
        s.send_window = s.send_window.saturating_add(h.length);
    } else if h.typ == TYPE_DATA && !payload.is_empty() {
        if s.recv.len() + payload.len() > INITIAL_WINDOW as usize + MAX_FRAME_PAYLOAD {
            return Err(YamuxError::BadFrame(format!(
                "stream {id}: peer exceeded the receive window"
            )));
        }
        s.recv.extend(payload);
    }
    if h.flags & FLAG_FIN != 0 {
        s.recv_fin = true;
    }
    if h.flags & FLAG_RST != 0 {
        s.reset = true;
    }
    s.wake_all();
    let gone = s.reset || (s.recv_fin && s.sent_fin);
    drop(s);
    if gone {
        inner.streams.lock().unwrap().remove(&id);
    }
    Ok(())
}

/// One yamux stream; tokio `AsyncRead` + `AsyncWrite`. Shutdown sends FIN.
pub struct Stream {
    id: u32,
    state: Arc<Mutex<StreamState>>,
    session: Arc<Inner>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "yamux::Stream({})", self.id)
    }
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    fn send_fin(&self) {
        let mut s = self.state.lock().unwrap();
        if s.sent_fin || s.reset {
            return;
        }
        s.sent_fin = true;
        let gone = s.recv_fin;
        drop(s);
        self.session
            .send_frame(Header::new(TYPE_WINDOW_UPDATE, FLAG_FIN, self.id, 0), &[]);
        if gone {
            self.session.streams.lock().unwrap().remove(&self.id);
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = self.state.lock().unwrap();
        if !s.recv.is_empty() {
            let n = buf.remaining().min(s.recv.len());
            let (a, b) = s.recv.as_slices();
            if n <= a.len() {
                buf.put_slice(&a[..n]);
            } else {
                buf.put_slice(a);
                buf.put_slice(&b[..n - a.len()]);
            }
            s.recv.drain(..n);
            s.consumed += n as u32;
            if s.consumed >= INITIAL_WINDOW / 2 && !s.recv_fin {
                let delta = s.consumed;
                s.consumed = 0;
                drop(s);
                self.session
                    .send_frame(Header::new(TYPE_WINDOW_UPDATE, 0, self.id, delta), &[]);
            }
            return Poll::Ready(Ok(()));
        }
        if s.recv_fin {
            return Poll::Ready(Ok(()));
        }
        if s.reset || self.session.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("yamux stream {} was reset", self.id),
            )));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.state.lock().unwrap();
        if s.reset || self.session.closed.load(Ordering::SeqCst) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("yamux stream {} is closed", self.id),
            )));
        }
        if s.sent_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("yamux stream {}: write after close", self.id),
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if s.send_window == 0 {
            s.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(s.send_window as usize).min(MAX_FRAME_PAYLOAD);
        s.send_window -= n as u32;
        drop(s);
        self.session
            .send_frame(Header::new(TYPE_DATA, 0, self.id, n as u32), &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send_fin();
        Poll::Ready(Ok(()))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.send_fin();
        self.session.streams.lock().unwrap().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_files() -> Vec<std::path::PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/docs/packer-transcripts/captures");
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path().join("frames.txt");
                if p.exists() {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn header_roundtrip_against_captured_frames() {
        let files = frames_files();
        if files.is_empty() {
            eprintln!("SKIP: packer-transcripts captures not found next to the project");
            return;
        }
        let mut n = 0;
        for f in files {
            for line in std::fs::read_to_string(&f).unwrap().lines() {
                let Some(hdr) = line.split_whitespace().find_map(|w| w.strip_prefix("hdr=")) else {
                    continue;
                };
                let bytes: [u8; 12] = hex::decode(hdr).unwrap().try_into().unwrap();
                let h = Header::decode(&bytes).unwrap();
                assert_eq!(h.encode(), bytes);
                let typ = match h.typ {
                    TYPE_DATA => "DATA",
                    TYPE_WINDOW_UPDATE => "WINDOW_UPDATE",
                    TYPE_PING => "PING",
                    _ => "GO_AWAY",
                };
                assert!(line.contains(typ), "{line}");
                assert!(line.contains(&format!("stream={}", h.stream_id)), "{line}");
                if h.typ == TYPE_DATA {
                    let payload = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("payload="))
                        .unwrap_or("");
                    assert_eq!(payload.len() / 2, h.length as usize, "{line}");
                }
                n += 1;
            }
        }
        assert!(n > 500, "only {n} frames checked");
    }

    #[test]
    fn header_examples() {
        let open = Header::new(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0);
        assert_eq!(hex::encode(open.encode()), "000100010000000100000000");
        let ping_ack = Header::new(TYPE_PING, FLAG_ACK, 0, 0);
        assert_eq!(hex::encode(ping_ack.encode()), "000200020000000000000000");
        assert!(Header::decode(&[1u8; 12]).is_err());
    }

    #[tokio::test]
    async fn bad_frame_ends_the_session_with_an_error() {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (ar, aw) = a.into_split();
        let (_s, _inc, done) = Session::start(ar, aw, true, false);
        b.write_all(&[7u8; 12]).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), done)
            .await
            .expect("no hang")
            .unwrap();
        assert!(matches!(e, Some(YamuxError::BadFrame(_))), "{e:?}");
    }

    #[tokio::test]
    async fn streams_pings_and_flow_control() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        let (server, mut server_in, _sd) = Session::start(ar, aw, true, false);
        let (client, _client_in, _cd) = Session::start(br, bw, false, false);
        // client opens, server accepts; 1 MiB crosses the 256 KiB window
        let mut cs = client.open().unwrap();
        assert_eq!(cs.id(), 1);
        let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let w = tokio::spawn(async move {
            cs.write_all(&d2).await.unwrap();
            cs.shutdown().await.unwrap();
            let mut back = Vec::new();
            cs.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut ss = server_in.accept().await.unwrap();
        let mut got = Vec::new();
        ss.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        ss.write_all(b"bye").await.unwrap();
        ss.shutdown().await.unwrap();
        assert_eq!(w.await.unwrap(), b"bye");
        // server-opened stream gets an even id
        let s2 = server.open().unwrap();
        assert_eq!(s2.id(), 2);
        // pings both ways
        server.ping(Duration::from_secs(2)).await.unwrap();
        client.ping(Duration::from_secs(2)).await.unwrap();
    }
}
