//! Worker threads for the data plane, one runtime each, as nginx runs one
//! worker process per core.
//!
//! With more than one core the proxy does not use tokio's work-stealing
//! runtime: measured on two cores (`benches/compare.py --spread`), it spent
//! 1.6× nginx's CPU per request, in cross-thread wake-ups, steals and the
//! atomics they take. Instead each worker thread runs a single-threaded
//! runtime; the accept loop hands each new connection to the next worker,
//! and everything that connection does, the upstream connections it opens
//! included, stays on that worker (the upstream pools keep one shard per
//! worker, see `current`). Tasks never move between threads.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker running on this thread: 1..=N on worker threads, 0 elsewhere
/// (the main runtime, tests).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The worker threads, or none (everything runs on the caller's runtime).
#[derive(Debug, Default)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// No worker threads: work is spawned on the current runtime.
    pub fn none() -> Workers {
        Workers::default()
    }

    /// `n` worker threads, each running a single-threaded runtime until the
    /// process exits.
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut handles = Vec::with_capacity(n);
        for i in 1..=n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("shardgate-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    rt.block_on(std::future::pending::<()>());
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Whether there are worker threads to hand work to.
    pub fn any(&self) -> bool {
        !self.handles.is_empty()
    }

    /// Run `f` on the next worker in turn (on the current runtime if there
    /// are none).
    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            tokio::spawn(f);
        } else {
            let k = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
            self.handles[k].spawn(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_is_dealt_to_each_worker_in_turn_and_stays_on_its_thread() {
        let workers = Workers::start(2).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let tx = tx.clone();
            workers.spawn(async move {
                let before = (current(), std::thread::current().id());
                // A task spawned from a worker runs on that worker too.
                let inner = tokio::spawn(async { (current(), std::thread::current().id()) })
                    .await
                    .unwrap();
                let _ = tx.send((before, inner));
            });
        }
        drop(tx);
        let mut seen = Vec::new();
        while let Some((before, inner)) = rx.recv().await {
            assert_eq!(before, inner);
            seen.push(before.0);
        }
        seen.sort_unstable();
        assert_eq!(seen, [1, 1, 2, 2]);
        assert_eq!(current(), 0, "the test's own thread is no worker");
    }
}
