//! Progress of a phase (bytes and items), shown as a self-updating line on a
//! terminal and as occasional plain lines otherwise (logs, CI, Packer).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Inner {
    bytes: AtomicU64,
    items: AtomicU64,
    total_bytes: AtomicU64,
    total_items: AtomicU64,
    done: AtomicBool,
}

/// A shared progress counter. Clones share the same counters.
#[derive(Clone, Default)]
pub struct Progress {
    inner: Arc<Inner>,
}

impl Progress {
    pub fn new(total_items: u64, total_bytes: u64) -> Progress {
        let p = Progress::default();
        p.inner.total_items.store(total_items, Ordering::Relaxed);
        p.inner.total_bytes.store(total_bytes, Ordering::Relaxed);
        p
    }
    pub fn add_bytes(&self, n: u64) {
        self.inner.bytes.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub_bytes(&self, n: u64) {
        let _ = self
            .inner
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n))
            });
    }
    pub fn add_item(&self) {
        self.inner.items.fetch_add(1, Ordering::Relaxed);
    }
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }
    pub fn items(&self) -> u64 {
        self.inner.items.load(Ordering::Relaxed)
    }

    fn line(&self, label: &str, started: Instant) -> String {
        let i = &self.inner;
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let b = self.bytes();
        format!(
            "{label}: {}/{} packages, {:.1}/{:.1} MiB, {:.1} MiB/s",
            self.items(),
            i.total_items.load(Ordering::Relaxed),
            b as f64 / 1048576.0,
            i.total_bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
            b as f64 / 1048576.0 / secs
        )
    }

    /// Starts a reporter thread writing to stderr until [`Reporter::finish`].
    pub fn report(&self, label: &str, quiet: bool) -> Reporter {
        let tty = std::io::stderr().is_terminal();
        let me = self.clone();
        let label = label.to_string();
        let started = Instant::now();
        let handle = (!quiet).then(|| {
            std::thread::spawn(move || {
                let period = if tty {
                    Duration::from_millis(150)
                } else {
                    Duration::from_secs(5)
                };
                let mut last = Instant::now();
                while !me.inner.done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() >= period {
                        last = Instant::now();
                        let l = me.line(&label, started);
                        let mut e = std::io::stderr().lock();
                        if tty {
                            let _ = write!(e, "\r\x1b[K{l}");
                        } else {
                            let _ = writeln!(e, "{l}");
                        }
                    }
                }
                let l = me.line(&label, started);
                let mut e = std::io::stderr().lock();
                if tty {
                    let _ = writeln!(e, "\r\x1b[K{l}");
                } else {
                    let _ = writeln!(e, "{l}");
                }
            })
        });
        Reporter {
            progress: self.clone(),
            handle,
        }
    }
}

/// Stops the reporter thread on `finish` or drop (printing a final line).
pub struct Reporter {
    progress: Progress,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    pub fn finish(mut self) {
        self.stop();
    }
    fn stop(&mut self) {
        self.progress.inner.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop();
    }
}
