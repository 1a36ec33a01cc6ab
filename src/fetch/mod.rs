//! Downloads: `http(s)://` and `file://` URLs, whole-body or verified-to-disk,
//! with bounded parallelism, retries and a package cache.
//!
//! * Each host name is resolved **once** per run and its connections are reused
//!   (per-file connections and lookups stall for seconds on some resolvers).
//! * Transient failures (connection errors, timeouts, HTTP 5xx/408/429, a body
//!   shorter than announced or than the index says) are retried with exponential
//!   backoff; 404 is final.
//! * Files are written under a temporary name in the destination directory,
//!   checked against the expected size and SHA256, then renamed: a reader never
//!   sees a partial or unverified file under the final name.

pub mod progress;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};

pub use progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: not found (HTTP 404)")]
    NotFound { url: String },
    #[error("{url}: HTTP {status} after {attempts} attempt(s)")]
    Status {
        url: String,
        status: u16,
        attempts: u32,
    },
    #[error("{url}: {reason} after {attempts} attempt(s)")]
    Transport {
        url: String,
        reason: String,
        attempts: u32,
    },
    #[error("{url}: truncated download ({got} of {want} bytes) after {attempts} attempt(s)")]
    Truncated {
        url: String,
        got: u64,
        want: u64,
        attempts: u32,
    },
    #[error("{what}: checksum mismatch for {url}: expected SHA256 {expected} ({size} bytes), got {actual} ({got} bytes)")]
    Checksum {
        what: String,
        url: String,
        expected: String,
        size: u64,
        actual: String,
        got: u64,
    },
    #[error("{url}: cannot resolve host {host}: {reason}")]
    Resolve {
        url: String,
        host: String,
        reason: String,
    },
    #[error("unsupported URL {url}: only http://, https:// and file:// are supported")]
    Scheme { url: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("offline: {what} is not in the cache ({path})")]
    NotCached { what: String, path: PathBuf },
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a downloaded file must match.
#[derive(Debug, Clone)]
pub struct Expected {
    pub sha256: String,
    pub size: u64,
}

/// One `.deb` to bring into the cache.
#[derive(Debug, Clone)]
pub struct DebItem {
    pub package: String,
    pub url: String,
    pub expected: Expected,
    /// Its path in the cache.
    pub dest: PathBuf,
}

/// Tuning knobs.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Parallel transfers.
    pub jobs: usize,
    /// Attempts per file (1 = no retry).
    pub attempts: u32,
    /// First retry delay; doubled each time.
    pub backoff: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            jobs: 8,
            attempts: 4,
            backoff: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// What `fetch_debs` did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    pub downloaded: usize,
    pub downloaded_bytes: u64,
    pub cached: usize,
    pub cached_bytes: u64,
    /// Cached files that failed their check and were fetched again.
    pub replaced: usize,
}

/// The downloader. Cheap to share behind an `Arc`.
pub struct Fetcher {
    client: reqwest::Client,
    opts: FetchOptions,
}

enum Attempt<T> {
    Done(T),
    Retry(FetchError),
    Fail(FetchError),
}

/// The host part of an http(s) URL.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit('@').next()?;
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (h, r) = v6.split_once(']')?;
        let port = r
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return Some((h.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((authority.to_string(), default)),
    }
}

/// The local path of a `file://` URL.
pub fn file_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://").map(PathBuf::from)
}

/// Joins a mirror base URL and a path relative to it.
pub fn join(base: &str, rel: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        rel.trim_start_matches('/')
    )
}

impl Fetcher {
    /// A fetcher for URLs under `bases`; every http(s) host among them is resolved
    /// now, once, and pinned for the client's lifetime.
    pub async fn new(bases: &[&str], opts: FetchOptions) -> Result<Fetcher, FetchError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.read_timeout)
            .pool_max_idle_per_host(opts.jobs.max(1))
            .user_agent(concat!("packer-plugin-nspawn/", env!("CARGO_PKG_VERSION")));
        let mut seen: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        for base in bases {
            if file_path(base).is_some() {
                continue;
            }
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                return Err(FetchError::Scheme {
                    url: base.to_string(),
                });
            }
            let Some((host, port)) = host_port(base) else {
                return Err(FetchError::Scheme {
                    url: base.to_string(),
                });
            };
            if seen.contains_key(&host) || host.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| FetchError::Resolve {
                    url: base.to_string(),
                    host: host.clone(),
                    reason: e.to_string(),
                })?
                .collect();
            if addrs.is_empty() {
                return Err(FetchError::Resolve {
                    url: base.to_string(),
                    host,
                    reason: "no addresses".into(),
                });
            }
            tracing::debug!("resolved {host} once: {addrs:?}");
            builder = builder.resolve_to_addrs(&host, &addrs);
            seen.insert(host, addrs);
        }
        let client = builder
            .build()
            .map_err(|e| FetchError::Client(e.to_string()))?;
        Ok(Fetcher { client, opts })
    }

    pub fn options(&self) -> &FetchOptions {
        &self.opts
    }

    async fn retry<T, F, Fut>(&self, url: &str, mut f: F) -> Result<T, FetchError>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        let mut delay = self.opts.backoff;
        let attempts = self.opts.attempts.max(1);
        for n in 1..=attempts {
            match f(n).await {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e) if n == attempts => return Err(e),
                Attempt::Retry(e) => {
                    tracing::warn!("{e}; retrying {url} in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        unreachable!("attempts >= 1")
    }

    /// Sends one GET; classifies the outcome.
    async fn send(&self, url: &str, attempt: u32) -> Attempt<reqwest::Response> {
        match self.client.get(url).send().await {
            Ok(r) if r.status().is_success() => Attempt::Done(r),
            Ok(r) if r.status().as_u16() == 404 || r.status().as_u16() == 410 => {
                Attempt::Fail(FetchError::NotFound { url: url.into() })
            }
            Ok(r) => {
                let status = r.status().as_u16();
                let e = FetchError::Status {
                    url: url.into(),
                    status,
                    attempts: attempt,
                };
                if status >= 500 || status == 408 || status == 429 {
                    Attempt::Retry(e)
                } else {
                    Attempt::Fail(e)
                }
            }
            Err(e) => Attempt::Retry(FetchError::Transport {
                url: url.into(),
                reason: error_chain(&e),
                attempts: attempt,
            }),
        }
    }

    /// The whole body of `url` (small files: InRelease, indices).
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        if let Some(p) = file_path(url) {
            return std::fs::read(&p).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    FetchError::NotFound { url: url.into() }
                } else {
                    FetchError::Io { path: p, source: e }
                }
            });
        }
        self.retry(url, |n| async move {
            let resp = match self.send(url, n).await {
                Attempt::Done(r) => r,
                Attempt::Retry(e) => return Attempt::Retry(e),
                Attempt::Fail(e) => return Attempt::Fail(e),
            };
            let want = resp.content_length();
            match resp.bytes().await {
                Ok(b) if want.is_some_and(|w| w != b.len() as u64) => {
                    Attempt::Retry(FetchError::Truncated {
                        url: url.into(),
                        got: b.len() as u64,
                        want: want.unwrap_or(0),
                        attempts: n,
                    })
                }
                Ok(b) => Attempt::Done(b.to_vec()),
                Err(e) => Attempt::Retry(FetchError::Transport {
                    url: url.into(),
                    reason: error_chain(&e),
                    attempts: n,
                }),
            }
        })
        .await
    }

    /// Streams `url` (of unknown size and hash: an image to import) to `dest`
    /// through a temporary sibling, retrying transient failures and bodies shorter
    /// than their Content-Length. Returns the bytes written and their SHA256, for
    /// the caller to check against whatever checksum it has.
    pub async fn get_to_file(
        &self,
        url: &str,
        dest: &Path,
        progress: Option<&(dyn Fn(u64) + Sync)>,
    ) -> Result<(u64, String), FetchError> {
        let tmp = temp_name(dest);
        let result = self
            .retry(url, |n| {
                let tmp = tmp.clone();
                async move {
                    let mut resp = match self.send(url, n).await {
                        Attempt::Done(r) => r,
                        Attempt::Retry(e) => return Attempt::Retry(e),
                        Attempt::Fail(e) => return Attempt::Fail(e),
                    };
                    let want = resp.content_length();
                    let mut file = match std::fs::File::create(&tmp) {
                        Ok(f) => std::io::BufWriter::with_capacity(1 << 20, f),
                        Err(e) => return Attempt::Fail(io_err(&tmp)(e)),
                    };
                    let mut hasher = Sha256::new();
                    let mut got = 0u64;
                    loop {
                        match resp.chunk().await {
                            Ok(Some(c)) => {
                                hasher.update(&c);
                                if let Err(e) = file.write_all(&c) {
                                    return Attempt::Fail(io_err(&tmp)(e));
                                }
                                got += c.len() as u64;
                                if let Some(p) = progress {
                                    p(got);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                return Attempt::Retry(FetchError::Transport {
                                    url: url.into(),
                                    reason: error_chain(&e),
                                    attempts: n,
                                })
                            }
                        }
                    }
                    if let Err(e) = file.flush() {
                        return Attempt::Fail(io_err(&tmp)(e));
                    }
                    if want.is_some_and(|w| w != got) {
                        return Attempt::Retry(FetchError::Truncated {
                            url: url.into(),
                            got,
                            want: want.unwrap_or(0),
                            attempts: n,
                        });
                    }
                    Attempt::Done((got, hex::encode(hasher.finalize())))
                }
            })
            .await;
        match result {
            Ok(v) => {
                std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
                Ok(v)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Downloads `url` to `dest`, verified against `expected`; `what` names the
    /// thing for errors (a package or an index file). Returns the bytes written.
    pub async fn get_verified(
        &self,
        url: &str,
        expected: &Expected,
        dest: &Path,
        what: &str,
        progress: Option<&Progress>,
    ) -> Result<u64, FetchError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = temp_name(dest);
        let result = self
            .retry(url, |n| {
                let tmp = tmp.clone();
                async move {
                    let r = self
                        .attempt_to_file(url, expected, &tmp, what, n, progress)
                        .await;
                    if !matches!(r, Attempt::Done(_)) {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    r
                }
            })
            .await;
        match result {
            Ok(n) => {
                std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
                Ok(n)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    async fn attempt_to_file(
        &self,
        url: &str,
        expected: &Expected,
        tmp: &Path,
        what: &str,
        n: u32,
        progress: Option<&Progress>,
    ) -> Attempt<u64> {
        let mut file = match std::fs::File::create(tmp) {
            Ok(f) => std::io::BufWriter::with_capacity(256 * 1024, f),
            Err(e) => return Attempt::Fail(io_err(tmp)(e)),
        };
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        if let Some(src) = file_path(url) {
            let mut input = match std::fs::File::open(&src) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Attempt::Fail(FetchError::NotFound { url: url.into() })
                }
                Err(e) => return Attempt::Fail(io_err(&src)(e)),
            };
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let k = match std::io::Read::read(&mut input, &mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) => return Attempt::Fail(io_err(&src)(e)),
                };
                hasher.update(&buf[..k]);
                if let Err(e) = file.write_all(&buf[..k]) {
                    return Attempt::Fail(io_err(tmp)(e));
                }
                got += k as u64;
                if let Some(p) = progress {
                    p.add_bytes(k as u64);
                }
            }
        } else {
            let mut resp = match self.send(url, n).await {
                Attempt::Done(r) => r,
                Attempt::Retry(e) => return Attempt::Retry(e),
                Attempt::Fail(e) => return Attempt::Fail(e),
            };
            loop {
                match resp.chunk().await {
                    Ok(Some(chunk)) => {
                        hasher.update(&chunk);
                        if let Err(e) = file.write_all(&chunk) {
                            return Attempt::Fail(io_err(tmp)(e));
                        }
                        got += chunk.len() as u64;
                        if let Some(p) = progress {
                            p.add_bytes(chunk.len() as u64);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(p) = progress {
                            p.sub_bytes(got);
                        }
                        return Attempt::Retry(FetchError::Transport {
                            url: url.into(),
                            reason: error_chain(&e),
                            attempts: n,
                        });
                    }
                }
            }
        }
        if let Err(e) = file.flush() {
            return Attempt::Fail(io_err(tmp)(e));
        }
        let is_file = file_path(url).is_some();
        if got < expected.size {
            if let Some(p) = progress {
                p.sub_bytes(got);
            }
            let e = FetchError::Truncated {
                url: url.into(),
                got,
                want: expected.size,
                attempts: n,
            };
            return if is_file {
                Attempt::Fail(checksum_err(
                    what,
                    url,
                    expected,
                    &hex::encode(hasher.finalize()),
                    got,
                ))
            } else {
                Attempt::Retry(e)
            };
        }
        let actual = hex::encode(hasher.finalize());
        if got != expected.size || !actual.eq_ignore_ascii_case(&expected.sha256) {
            if let Some(p) = progress {
                p.sub_bytes(got);
            }
            let e = checksum_err(what, url, expected, &actual, got);
            // A corrupting proxy may do better on a second try; a file never does.
            return if is_file || n >= 2 {
                Attempt::Fail(e)
            } else {
                Attempt::Retry(e)
            };
        }
        Attempt::Done(got)
    }

    /// Brings every item into the cache: a cached file with the right size and
    /// SHA256 is kept, a wrong one is replaced, a missing one downloaded; up to
    /// `jobs` transfers run at once. With `offline`, nothing is downloaded and the
    /// first missing item is an error naming every missing package.
    pub async fn fetch_debs(
        self: &Arc<Self>,
        items: &[DebItem],
        offline: bool,
        progress: &Progress,
    ) -> Result<FetchReport, FetchError> {
        // First pass: check the cache (hashing is CPU work; do it on the blocking pool).
        let checks = futures::stream::iter(items.iter().cloned().map(|item| {
            tokio::task::spawn_blocking(move || {
                let state = cache_state(&item.dest, &item.expected);
                (item, state)
            })
        }))
        .buffer_unordered(2)
        .collect::<Vec<_>>()
        .await;
        let mut todo = Vec::new();
        let mut report = FetchReport::default();
        let mut missing = Vec::new();
        for r in checks {
            let (item, state) = r.map_err(|e| FetchError::Client(e.to_string()))?;
            match state? {
                CacheState::Good => {
                    report.cached += 1;
                    report.cached_bytes += item.expected.size;
                    progress.add_bytes(item.expected.size);
                    progress.add_item();
                }
                CacheState::Bad => {
                    report.replaced += 1;
                    let _ = std::fs::remove_file(&item.dest);
                    missing.push(item.package.clone());
                    todo.push(item);
                }
                CacheState::Missing => {
                    missing.push(item.package.clone());
                    todo.push(item);
                }
            }
        }
        if offline && !todo.is_empty() {
            missing.sort();
            return Err(FetchError::NotCached {
                what: format!("package(s) {}", missing.join(", ")),
                path: todo[0].dest.parent().unwrap_or(Path::new("")).to_path_buf(),
            });
        }
        let results = futures::stream::iter(todo.into_iter().map(|item| {
            let this = Arc::clone(self);
            let progress = progress.clone();
            async move {
                let what = format!("package {}", item.package);
                let n = this
                    .get_verified(
                        &item.url,
                        &item.expected,
                        &item.dest,
                        &what,
                        Some(&progress),
                    )
                    .await?;
                progress.add_item();
                Ok::<u64, FetchError>(n)
            }
        }))
        .buffer_unordered(self.opts.jobs.max(1))
        .collect::<Vec<_>>()
        .await;
        for r in results {
            report.downloaded_bytes += r?;
            report.downloaded += 1;
        }
        Ok(report)
    }
}

fn checksum_err(what: &str, url: &str, expected: &Expected, actual: &str, got: u64) -> FetchError {
    FetchError::Checksum {
        what: what.into(),
        url: url.into(),
        expected: expected.sha256.clone(),
        size: expected.size,
        actual: actual.into(),
        got,
    }
}

enum CacheState {
    Good,
    Bad,
    Missing,
}

fn cache_state(path: &Path, expected: &Expected) -> Result<CacheState, FetchError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CacheState::Missing),
        Err(e) => return Err(io_err(path)(e)),
    };
    if !meta.is_file() || meta.len() != expected.size {
        return Ok(CacheState::Bad);
    }
    let actual = sha256_file(path)?;
    Ok(if actual.eq_ignore_ascii_case(&expected.sha256) {
        CacheState::Good
    } else {
        CacheState::Bad
    })
}

/// SHA256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// SHA256 of bytes, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A temporary sibling of `dest`, unique per process and call.
pub fn temp_name(dest: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(
        ".{name}.part-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The cache file name of a package, as apt names it (`:` of an epoch as `%3a`).
pub fn deb_cache_name(package: &str, version: &str, arch: &str) -> String {
    format!("{package}_{}_{arch}.deb", version.replace(':', "%3a"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("http://a.example/debian"),
            Some(("a.example".into(), 80))
        );
        assert_eq!(
            host_port("https://a.example:8443/x"),
            Some(("a.example".into(), 8443))
        );
        assert_eq!(host_port("http://[::1]:81/x"), Some(("::1".into(), 81)));
        assert_eq!(
            join("http://h/debian/", "/dists/x"),
            "http://h/debian/dists/x"
        );
        assert_eq!(file_path("file:///srv/r"), Some(PathBuf::from("/srv/r")));
        assert_eq!(deb_cache_name("a", "1:2.0", "amd64"), "a_1%3a2.0_amd64.deb");
    }

    #[tokio::test]
    async fn streamed_download_retries_truncation_and_reports_the_hash() {
        use crate::testkit::http::{Fault, HttpServer};
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(dir.path().join("img.tar"), &body).unwrap();
        let server = HttpServer::start(dir.path());
        server.fault("img.tar", Fault::Truncate, 1);
        let url = server.url("/img.tar");
        let mut o = FetchOptions::default();
        o.backoff = Duration::from_millis(10);
        let f = Fetcher::new(&[url.as_str()], o).await.unwrap();
        let dest = dir.path().join("out/img.tar");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let (n, sha) = f.get_to_file(&url, &dest, None).await.unwrap();
        assert_eq!((n, sha), (body.len() as u64, sha256_hex(&body)));
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(
            server.requests().len(),
            2,
            "the truncated attempt was retried"
        );
        // Always truncated: a clear error and no file, partial or final.
        server.fault("img.tar", Fault::Truncate, 100);
        let dest2 = dir.path().join("out/img2.tar");
        let e = f.get_to_file(&url, &dest2, None).await.unwrap_err();
        assert!(e.to_string().contains("img.tar"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path().join("out")).unwrap().count(),
            1
        );
    }

    #[tokio::test]
    async fn file_urls_verified_and_temp_files_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"hello").unwrap();
        let f = Fetcher::new(&[], FetchOptions::default()).await.unwrap();
        let url = format!("file://{}", src.display());
        let good = Expected {
            sha256: sha256_hex(b"hello"),
            size: 5,
        };
        let dest = dir.path().join("out/dest.bin");
        assert_eq!(
            f.get_verified(&url, &good, &dest, "thing", None)
                .await
                .unwrap(),
            5
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        let bad = Expected {
            sha256: sha256_hex(b"other"),
            size: 5,
        };
        let dest2 = dir.path().join("out/dest2.bin");
        let e = f
            .get_verified(&url, &bad, &dest2, "package x", None)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("package x") && e.to_string().contains("checksum"),
            "{e}"
        );
        assert!(!dest2.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only dest.bin remains");
        let e = f
            .get(&format!("file://{}/missing", dir.path().display()))
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::NotFound { .. }));
    }
}
