//! What the lab, the tests and the benchmark need from the host, set up on
//! first use so that `cargo test` as root needs nothing but the Rust
//! toolchain: programs are installed with `apt-get` (non-interactive), at
//! most once per program per process and one installer at a time across
//! processes (a lock file), and the TUN device node is created if missing.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context};

/// A program and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

/// iproute2's `ip`: namespaces and links in the lab, and fep's own network set-up.
pub const IP: Tool = Tool {
    program: "ip",
    package: "iproute2",
};
/// nftables: the benchmark's DNAT peer, and tests that drop chosen packets.
pub const NFT: Tool = Tool {
    program: "nft",
    package: "nftables",
};
/// keepalived (VRRP): moves VIP groups' addresses between the cluster lab's gateways.
pub const KEEPALIVED: Tool = Tool {
    program: "keepalived",
    package: "keepalived",
};
/// `promtool check metrics`: the metrics test checks fep's exposition format with it.
pub const PROMTOOL: Tool = Tool {
    program: "promtool",
    package: "prometheus",
};

/// `dig`: the sites tests ask fep's DNS server as an operator would.
pub const DIG: Tool = Tool {
    program: "dig",
    package: "bind9-dnsutils",
};
/// curl: the sites tests follow a full site's redirect with `curl -L`.
pub const CURL: Tool = Tool {
    program: "curl",
    package: "curl",
};
/// dnsperf: the DNS benchmark's load generator.
pub const DNSPERF: Tool = Tool {
    program: "dnsperf",
    package: "dnsperf",
};
/// gdnsd: the DNS benchmark's peer, an authoritative server with the same zone.
pub const GDNSD: Tool = Tool {
    program: "gdnsd",
    package: "gdnsd",
};

/// iperf3: the affinity-group test's control connection and UDP stream.
pub const IPERF3: Tool = Tool {
    program: "iperf3",
    package: "iperf3",
};

/// `systemd-analyze verify`: the package test checks the installed units with it.
pub const SYSTEMD_ANALYZE: Tool = Tool {
    program: "systemd-analyze",
    package: "systemd",
};
/// dpkg-shlibdeps: `tools/build-deb` finds the package's library dependencies with it.
pub const DPKG_SHLIBDEPS: Tool = Tool {
    program: "dpkg-shlibdeps",
    package: "dpkg-dev",
};

/// Where the shared lock lives; every process that installs takes it.
const LOCK_FILE: &str = "/run/lock/fep-tools-install.lock";
/// How long apt-get waits for another apt or dpkg (not ours) to finish.
const APT_LOCK_TIMEOUT_S: u32 = 300;

/// The outcome of each package's installation in this process, so that
/// parallel tests try it once.
static INSTALLED: Mutex<BTreeMap<&'static str, Result<(), String>>> = Mutex::new(BTreeMap::new());

/// The path of `program` on `PATH` (where `Command::new` finds it), if it is there.
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The tools of `tools` that are not installed.
pub fn missing(tools: &[Tool]) -> Vec<Tool> {
    tools
        .iter()
        .filter(|t| find(t.program).is_none())
        .copied()
        .collect()
}

/// Installs whichever of `tools` is missing; an error names the packages
/// and why apt-get could not install them.
pub fn ensure(tools: &[Tool]) -> anyhow::Result<()> {
    if missing(tools).is_empty() {
        return Ok(());
    }
    let mut done = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    // Another thread may have installed them while this one waited.
    let missing = missing(tools);
    let todo: Vec<Tool> = missing
        .iter()
        .filter(|t| !done.contains_key(t.package))
        .copied()
        .collect();
    if !todo.is_empty() {
        let result = install_locked(&todo).map_err(|e| format!("{e:#}"));
        for t in &todo {
            done.insert(t.package, result.clone());
        }
    }
    let failure = missing.iter().find_map(|t| match &done[t.package] {
        Err(e) => Some(e.clone()),
        Ok(()) if find(t.program).is_none() => Some(format!(
            "package {} is installed but `{}` is not on PATH ({})",
            t.package,
            t.program,
            std::env::var("PATH").unwrap_or_default()
        )),
        Ok(()) => None,
    });
    match failure {
        Some(e) => bail!("{e}"),
        None => Ok(()),
    }
}

/// The Python that Debian's `python3-*` packages install modules for.
pub const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// A Python module and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PyModule {
    pub module: &'static str,
    pub package: &'static str,
}

/// dnspython: the sites tests' second DNS client.
pub const DNSPYTHON: PyModule = PyModule {
    module: "dns.message",
    package: "python3-dnspython",
};

fn importable(m: PyModule) -> bool {
    Command::new(DEBIAN_PYTHON)
        .args(["-c", &format!("import {}", m.module)])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs `m` for [`DEBIAN_PYTHON`] where it cannot be imported; returns
/// that Python's path.
pub fn ensure_python(m: PyModule) -> anyhow::Result<&'static str> {
    if !importable(m) {
        let _lock = lock()?;
        if !importable(m) {
            install_packages(
                &[m.package],
                &format!("Python module {} (package {})", m.module, m.package),
            )?;
        }
        if !importable(m) {
            bail!(
                "{DEBIAN_PYTHON} cannot import {} after installing {}",
                m.module,
                m.package
            );
        }
    }
    Ok(DEBIAN_PYTHON)
}

/// Installs `tools` under the cross-process lock (re-checking first: another
/// process may have installed them meanwhile).
fn install_locked(tools: &[Tool]) -> anyhow::Result<()> {
    let _lock = lock()?;
    let tools = missing(tools);
    if tools.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = tools.iter().map(|t| t.package).collect();
    let what = tools
        .iter()
        .map(|t| format!("`{}` (package {})", t.program, t.package))
        .collect::<Vec<_>>()
        .join(", ");
    install_packages(&packages, &what)
}

/// `apt-get install PACKAGES` (for `what`), under a lock the caller holds.
fn install_packages(packages: &[&str], what: &str) -> anyhow::Result<()> {
    if find("apt-get").is_none() {
        bail!("{what} not installed and there is no apt-get here: install them by hand");
    }
    eprintln!("installing {} (for {what})", packages.join(" "));
    // The package lists may be missing (fresh images) or stale: one update
    // and a second attempt when the first install fails.
    let install = || {
        apt(&[
            &["install", "-y", "-qq", "--no-install-recommends"],
            packages,
        ]
        .concat())
    };
    if install().is_ok() {
        return Ok(());
    }
    apt(&["update", "-qq"])?;
    install().with_context(|| format!("installing {what} failed; install them by hand"))
}

fn apt(args: &[&str]) -> anyhow::Result<()> {
    crate::netns::run(
        Command::new("apt-get")
            .arg("-o")
            .arg(format!("DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}"))
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// An exclusive lock on [`LOCK_FILE`], released when the file is dropped.
fn lock() -> anyhow::Result<File> {
    let path = Path::new(LOCK_FILE);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = File::create(path).with_context(|| format!("creating {LOCK_FILE}"))?;
    // SAFETY: flock(2) on an fd this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking {LOCK_FILE}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

/// `/dev/net/tun`, which fep opens, created (character device 10:200) where
/// a fresh container lacks it.
pub fn ensure_tun_device() -> anyhow::Result<()> {
    let path = Path::new("/dev/net/tun");
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all("/dev/net").context("creating /dev/net")?;
    // SAFETY: mknod(2) with a valid NUL-terminated path.
    let rc = unsafe {
        libc::mknod(
            c"/dev/net/tun".as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(10, 200),
        )
    };
    if rc != 0 {
        bail!(
            "creating /dev/net/tun: {} (fep needs the TUN device)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What every lab needs: `ip` and the TUN device.
pub fn prepare_lab() -> anyhow::Result<()> {
    ensure(&[IP])?;
    ensure_tun_device()
}
