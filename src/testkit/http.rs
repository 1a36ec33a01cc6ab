//! A tiny HTTP/1.1 file server on 127.0.0.1 for tests: keep-alive, GET only,
//! and fault injection (truncated bodies, 5xx answers) per path suffix.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What to do wrong for requests whose path ends with a given suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Announce the full length, send half the body, close.
    Truncate,
    /// Answer 503.
    Unavailable,
}

#[derive(Default)]
struct State {
    faults: Mutex<Vec<(String, Fault, usize)>>,
    requests: Mutex<Vec<String>>,
    connections: AtomicUsize,
    stop: AtomicBool,
}

/// A running server; stops when dropped.
pub struct HttpServer {
    pub port: u16,
    root: PathBuf,
    state: Arc<State>,
}

impl HttpServer {
    /// Serves files under `root`.
    pub fn start(root: impl Into<PathBuf>) -> HttpServer {
        let root = root.into();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let (st, rt) = (state.clone(), root.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                st.connections.fetch_add(1, Ordering::Relaxed);
                let (st, rt) = (st.clone(), rt.clone());
                std::thread::spawn(move || serve(conn, &rt, &st));
            }
        });
        HttpServer { port, root, state }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn root(&self) -> &PathBuf {
        &self.root
    }

    /// Injects `fault` for the next `times` requests whose path ends with `suffix`.
    pub fn fault(&self, suffix: &str, fault: Fault, times: usize) {
        self.state
            .faults
            .lock()
            .unwrap()
            .push((suffix.to_string(), fault, times));
    }

    /// Every request path so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn take_fault(state: &State, path: &str) -> Option<Fault> {
    let mut f = state.faults.lock().unwrap();
    let i = f
        .iter()
        .position(|(s, _, n)| *n > 0 && path.ends_with(s.as_str()))?;
    f[i].2 -= 1;
    Some(f[i].1)
}

fn serve(conn: TcpStream, root: &std::path::Path, state: &State) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        state.requests.lock().unwrap().push(path.to_string());
        if method != "GET" {
            let _ = out.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let rel = path.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            let _ = out.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        match take_fault(state, path) {
            Some(Fault::Unavailable) => {
                let _ =
                    out.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            Some(Fault::Truncate) => {
                if let Ok(body) = std::fs::read(root.join(rel)) {
                    let _ = write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = out.write_all(&body[..body.len() / 2]);
                }
                return; // close the connection mid-body
            }
            None => {}
        }
        match std::fs::File::open(root.join(rel)) {
            Ok(mut f) if f.metadata().is_ok_and(|m| m.is_file()) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match f.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            _ => {
                let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            }
        }
        if headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            return;
        }
    }
}
