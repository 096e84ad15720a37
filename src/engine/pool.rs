//! A fixed set of blocking worker threads for CPU-heavy work (decode, inference, encode).
//! Bounded concurrency: at most `workers` tasks run at once; the rest wait in the queue.
//! Callers get a `Ticket` they can `.await` (async) or `wait()` on (CLI).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

type Task = Box<dyn FnOnce() + Send + 'static>;

/// A submitted task's result: `.await` it from async code or `wait()` from a plain thread.
pub struct Ticket<R>(oneshot::Receiver<R>);

impl<R> Ticket<R> {
    /// Blocks the calling thread (never an async worker) until the task is done.
    pub fn wait(self) -> Result<R, Abandoned> {
        self.0.blocking_recv().map_err(|_| Abandoned)
    }
}

impl<R> Future for Ticket<R> {
    type Output = Result<R, Abandoned>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.map_err(|_| Abandoned))
    }
}

struct Counters {
    queued: AtomicUsize,
    running: AtomicUsize,
    /// Milliseconds after `epoch` at which a task last started or finished.
    progress_ms: AtomicU64,
    epoch: Instant,
}

impl Counters {
    fn progressed(&self) {
        self.progress_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

pub struct Pool {
    tx: Mutex<Option<mpsc::Sender<Task>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    workers: usize,
}

/// The task was dropped without an answer: its thread panicked or the pool shut down first.
#[derive(Debug, thiserror::Error)]
#[error("the worker running this task stopped before finishing it")]
pub struct Abandoned;

impl Pool {
    pub fn new(workers: usize) -> Pool {
        let workers = workers.max(1);
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let counters = Arc::new(Counters {
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let threads = (0..workers)
            .map(|i| {
                let rx = Arc::clone(&rx);
                let counters = Arc::clone(&counters);
                std::thread::Builder::new()
                    .name(format!("removebgd-worker-{i}"))
                    .spawn(move || {
                        loop {
                            let next = rx.lock().expect("queue lock poisoned").recv();
                            let Ok(task) = next else { break };
                            counters.queued.fetch_sub(1, Ordering::Relaxed);
                            counters.running.fetch_add(1, Ordering::Relaxed);
                            counters.progressed();
                            // A panicking task drops its sender (the caller sees `Abandoned`);
                            // the worker itself carries on.
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
                            counters.running.fetch_sub(1, Ordering::Relaxed);
                            counters.progressed();
                        }
                    })
                    .expect("spawn worker thread")
            })
            .collect();
        Pool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            counters,
            workers,
        }
    }

    /// Queues `f`; the tracing span current at submission follows it onto the worker.
    pub fn submit<R, F>(&self, f: F) -> Ticket<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (done, rx) = oneshot::channel();
        let span = tracing::Span::current();
        let task: Task = Box::new(move || {
            let _entered = span.enter();
            let _ = done.send(f());
        });
        if let Some(tx) = self.tx.lock().expect("pool lock poisoned").as_ref() {
            self.counters.queued.fetch_add(1, Ordering::Relaxed);
            if tx.send(task).is_err() {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ticket(rx)
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Tasks waiting for a worker.
    pub fn queued(&self) -> usize {
        self.counters.queued.load(Ordering::Relaxed)
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.counters.running.load(Ordering::Relaxed)
    }

    /// Whether a task is running and none has started or finished for `limit`: a worker is stuck.
    pub fn stalled(&self, limit: Duration) -> bool {
        let c = &self.counters;
        let since = c
            .epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(c.progress_ms.load(Ordering::Relaxed)));
        c.running.load(Ordering::Relaxed) > 0 && since > limit
    }

    /// Stops taking tasks, lets the queued and running ones finish, and joins the threads.
    pub fn shutdown(&self) {
        self.tx.lock().expect("pool lock poisoned").take();
        for t in self.threads.lock().expect("pool lock poisoned").drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn never_runs_more_than_its_workers() {
        let pool = Pool::new(2);
        let peak = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let rxs: Vec<_> = (0..8)
            .map(|i| {
                let (peak, now) = (Arc::clone(&peak), Arc::clone(&now));
                pool.submit(move || {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    // The first two wait for each other (as two workers let them), however
                    // slowly the threads start; the others overlap as they may.
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while i < 2 && peak.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    now.fetch_sub(1, Ordering::SeqCst);
                    i * 10
                })
            })
            .collect();
        let results: Vec<_> = rxs.into_iter().map(|r| r.wait().unwrap()).collect();
        assert_eq!(results, (0..8).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn counts_queued_and_running() {
        let pool = Pool::new(1);
        let gate = Arc::new(Barrier::new(2));
        let g = Arc::clone(&gate);
        let first = pool.submit(move || {
            g.wait();
            g.wait();
        });
        let second = pool.submit(|| ());
        gate.wait(); // the first task is running, the second waits
        assert_eq!((pool.running(), pool.queued()), (1, 1));
        gate.wait();
        first.wait().unwrap();
        second.wait().unwrap();
        // The worker lowers `running` just after handing the result over; give it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.running() != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!((pool.running(), pool.queued()), (0, 0));
    }

    #[test]
    fn a_long_task_counts_as_stalled_only_past_the_limit() {
        let pool = Pool::new(1);
        let gate = Arc::new(Barrier::new(2));
        let g = Arc::clone(&gate);
        let task = pool.submit(move || {
            g.wait();
            g.wait();
        });
        gate.wait(); // the task is running until the second wait
        assert!(!pool.stalled(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            pool.stalled(Duration::from_millis(30)),
            "running for longer than the limit"
        );
        gate.wait();
        task.wait().unwrap();
        // The worker clears its start time just after handing the result over.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.stalled(Duration::from_millis(1)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!pool.stalled(Duration::from_millis(1)), "an idle pool is not stalled");
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_worker_survives() {
        let pool = Pool::new(1);
        let r: Result<(), _> = pool.submit(|| panic!("boom")).wait();
        assert!(r.is_err());
        assert_eq!(pool.submit(|| 7).wait().unwrap(), 7);
    }

    #[test]
    fn shutdown_finishes_queued_work() {
        let pool = Pool::new(1);
        let rxs: Vec<_> = (0..3).map(|i| pool.submit(move || i)).collect();
        pool.shutdown();
        let got: Vec<_> = rxs.into_iter().map(|r| r.wait().unwrap()).collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert!(pool.submit(|| 1).wait().is_err(), "a stopped pool takes no new work");
    }
}
