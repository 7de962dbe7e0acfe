//! HTTP mode's threads: one single-threaded runtime each. A client
//! connection is accepted, served and sent on to its back end on one
//! thread (each has its own listener, by `SO_REUSEPORT`, and its own pools),
//! as HAProxy's and Pingora's threads do: a request never waits for another
//! thread to wake up.

use std::sync::Mutex;
use std::thread::JoinHandle;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Threads {
    handles: Vec<Handle>,
    /// Each thread's stop signal and the thread, until stopped.
    running: Mutex<Vec<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl Threads {
    /// Starts `n` threads named `fep-http-I`, each running its runtime
    /// until stopped.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let mut running = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start an HTTP-mode runtime")?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("fep-http-{i}"))
                .spawn(move || {
                    let _ = runtime.block_on(stopped);
                    // Dropping the runtime here ends its tasks: listeners,
                    // client and server connections close.
                })
                .context("cannot start an HTTP-mode thread")?;
            running.push((stop, thread));
        }
        Ok(Threads {
            handles,
            running: Mutex::new(running),
        })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Thread `i`'s runtime.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
    }

    /// Stops every thread and waits for it (its connections closed).
    pub fn stop(&self) {
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        for (stop, thread) in running {
            let _ = stop.send(());
            if thread.join().is_err() {
                tracing::error!("an HTTP-mode thread panicked");
            }
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop();
    }
}
