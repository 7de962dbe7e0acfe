//! A dedicated thread that brings something outside fep — the host's
//! network set-up, the state file — to the latest wanted value, so that
//! blocking work (`ip` calls, fsyncs) never runs on the thread that serves
//! agents, health checks and the admin API.
//!
//! A request returns at once. The thread applies values one at a time, in
//! the order they were asked for; a value superseded before the thread got
//! to it is skipped, since only the latest counts. So two applications
//! never overlap, and an older value is never applied after a newer one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::watch;

/// What the thread is asked to do next.
struct Wanted<T> {
    /// The latest value not yet taken by the thread.
    value: Option<T>,
    /// Counts requests; the generation of `value`.
    generation: u64,
    stopping: bool,
}

struct Shared<T> {
    wanted: Mutex<Wanted<T>>,
    wake: Condvar,
    /// The generation applied last (`u64::MAX` once the thread has ended).
    done: watch::Sender<u64>,
}

impl<T> Shared<T> {
    fn wanted(&self) -> MutexGuard<'_, Wanted<T>> {
        self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Latest<T> {
    shared: Arc<Shared<T>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T: Send + 'static> Latest<T> {
    /// Starts the thread `name`, which calls `apply` with each value it takes.
    pub fn spawn(name: &str, mut apply: impl FnMut(T) + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            wanted: Mutex::new(Wanted {
                value: None,
                generation: 0,
                stopping: false,
            }),
            wake: Condvar::new(),
            done: watch::Sender::new(0),
        });
        let mine = shared.clone();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(thread_name.clone())
            .spawn(move || {
                loop {
                    let (value, generation) = {
                        let mut w = mine.wanted();
                        while w.value.is_none() && !w.stopping {
                            w = mine.wake.wait(w).unwrap_or_else(|e| e.into_inner());
                        }
                        match w.value.take() {
                            Some(v) => (v, w.generation),
                            None => break,
                        }
                    };
                    // A panic must not leave waiters hanging: the value
                    // counts as done (and the next request is tried afresh).
                    if catch_unwind(AssertUnwindSafe(|| apply(value))).is_err() {
                        tracing::error!("{thread_name}: applying a change panicked; it is skipped");
                    }
                    mine.done.send_replace(generation);
                }
                mine.done.send_replace(u64::MAX);
            })?;
        Ok(Latest {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for `value` to be applied (replacing one still waiting), without
    /// waiting for it.
    pub fn request(&self, value: T) {
        let mut w = self.shared.wanted();
        w.value = Some(value);
        w.generation += 1;
        self.shared.wake.notify_one();
    }

    /// Waits, without blocking the thread, until every value requested so
    /// far has been applied or superseded by one that was.
    pub async fn settled(&self) {
        let target = self.shared.wanted().generation;
        let mut done = self.shared.done.subscribe();
        // The sender lives in `shared`, which `self` holds: this cannot fail.
        let _ = done.wait_for(|&d| d >= target).await;
    }

    /// Applies what is still waiting, then ends the thread; later requests
    /// are not applied.
    pub fn stop(&self) {
        self.shared.wanted().stopping = true;
        self.shared.wake.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl<T> Drop for Latest<T> {
    fn drop(&mut self) {
        self.shared.wanted().stopping = true;
        self.shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn block_on(f: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn values_are_applied_in_order_and_superseded_ones_skipped() {
        let (applied_tx, applied) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        let (release_tx, release) = mpsc::channel::<()>();
        let latest = Latest::spawn("test-latest", move |v: u32| {
            if v == 1 {
                // Hold the thread on the first value while more arrive.
                started_tx.send(()).unwrap();
                release.recv().unwrap();
            }
            applied_tx.send(v).unwrap();
        })
        .unwrap();
        latest.request(1);
        started.recv().unwrap();
        for v in 2..=5 {
            latest.request(v);
        }
        release_tx.send(()).unwrap();
        block_on(latest.settled());
        let seen: Vec<u32> = applied.try_iter().collect();
        assert_eq!(
            seen,
            [1, 5],
            "2 to 4 were superseded before the thread was free"
        );
        latest.request(6);
        block_on(latest.settled());
        assert_eq!(applied.try_iter().collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn stop_applies_what_is_waiting_and_nothing_after() {
        let (applied_tx, applied) = mpsc::channel();
        let latest = Latest::spawn("test-latest", move |v: u32| {
            std::thread::sleep(Duration::from_millis(20));
            applied_tx.send(v).unwrap();
        })
        .unwrap();
        latest.request(1);
        latest.request(2);
        latest.stop();
        let seen: Vec<u32> = applied.try_iter().collect();
        assert_eq!(
            seen.last(),
            Some(&2),
            "the latest was applied before the end: {seen:?}"
        );
        latest.request(3);
        block_on(latest.settled());
        assert!(applied.try_iter().next().is_none(), "nothing after stop");
    }

    #[test]
    fn a_panic_while_applying_does_not_hang_waiters() {
        let latest = Latest::spawn("test-latest", |v: u32| assert!(v != 1, "bad value")).unwrap();
        latest.request(1);
        block_on(latest.settled());
        latest.request(2);
        block_on(latest.settled());
    }
}
