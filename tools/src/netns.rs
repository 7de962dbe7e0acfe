//! Network namespaces as test hosts: created with `ip netns add`, deleted
//! when dropped (also when a test panics), entered by a thread with setns(2).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// True when running as root, which namespaces, veths and TUN devices need.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// Runs a command to completion, failing with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    output(cmd).map(drop)
}

/// Runs a command and returns its stdout.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A network namespace that exists while this value lives.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// `ip -n NAME ARGS`, returning stdout.
    pub fn ip_output(&self, args: &[&str]) -> anyhow::Result<String> {
        output(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it opens
    /// live there.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        let file = self.open()?;
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                join(&self.name, &file)?;
                Ok(f())
            });
            match thread.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// As [`Netns::enter`], on a thread of its own that runs on.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<R>>> {
        let (file, name) = (self.open()?, self.name.clone());
        Ok(std::thread::spawn(move || {
            join(&name, &file)?;
            Ok(f())
        }))
    }

    fn open(&self) -> anyhow::Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| format!("opening {path}"))
    }
}

/// Moves the calling thread into the namespace `file` (named `name`).
fn join(name: &str, file: &File) -> anyhow::Result<()> {
    // SAFETY: a valid namespace fd; only this thread switches.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    /// Kills whatever still runs in the namespace (a daemon's forked
    /// workers outlive the process the lab started), then deletes it.
    fn drop(&mut self) {
        if let Ok(pids) = output(Command::new("ip").args(["netns", "pids", &self.name])) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a process inside this lab's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}
