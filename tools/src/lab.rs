//! A dispatcher lab on one machine: a client, a gateway that runs fep, and
//! back ends, each a network namespace with addresses only inside them.
//!
//! ```text
//!  client 10.0.1.2 ── 10.0.1.1 gateway (fep, VIP 10.0.0.100 / fd00::100) 10.0.2.1 ─┬─ b1 ── be1 10.0.2.11
//!         fd00:1::2    fd00:1::1                                          fd00:2::1  ├─ b2 ── be2 10.0.2.12
//!                                                                                    └─ b3 ── be3 10.0.2.13
//! ```
//!
//! The gateway gets no forwarding, routes or rules from the lab: fep sets up
//! all of that itself. Everything (processes, namespaces, files) goes away
//! when the lab is dropped.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::Netns;

pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);

/// Back end `i` (0-based): 10.0.2.(11+i).
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 2, 11 + i as u8)
}

/// Back end `i` (0-based): fd00:2::(11+i) (hex digits as written).
pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// Node name of back end `i`: be1, be2, …
pub fn backend_name(i: usize) -> String {
    format!("be{}", i + 1)
}

static LABS: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Whether this thread's lab configs turn the kernel fast path on.
    static FAST_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside [`with_fast_path`].
pub fn fast_path_on() -> bool {
    FAST_PATH.get()
}

/// Runs `f` with every config this thread's labs write turning the kernel
/// fast path on (`fast_path = "tc-bpf"`), and every fep started from such a
/// config checked to be running it: the tests that run in both modes.
pub fn with_fast_path<R>(f: impl FnOnce() -> R) -> R {
    FAST_PATH.set(true);
    let r = f();
    FAST_PATH.set(false);
    r
}

/// A new lab's unique name prefix (`<tag><pid>x<n>`, so that parallel
/// tests and runs never collide) and its scratch directory, after
/// installing `ip` and creating the TUN device node where missing.
pub(crate) fn prepare(tag: &str) -> anyhow::Result<(String, PathBuf)> {
    crate::host::prepare_lab()?;
    let prefix = format!(
        "{tag}{}x{}",
        std::process::id(),
        LABS.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((prefix, dir))
}

pub struct Lab {
    pub client: Netns,
    pub gateway: Netns,
    pub backends: Vec<Netns>,
    dir: PathBuf,
    /// Processes the lab started, with the back end they belong to.
    children: Vec<(Option<usize>, Child)>,
}

impl Lab {
    /// Builds the namespaces and links (first installing `ip` and creating
    /// the TUN device node where missing); `tag` goes into the names
    /// (`<tag><pid>x<n>-…`) so that parallel tests and runs never collide.
    pub fn new(tag: &str, backends: usize) -> anyhow::Result<Lab> {
        let (prefix, dir) = prepare(tag)?;
        let mut lab = Lab {
            client: Netns::create(&format!("{prefix}-cl"))?,
            gateway: Netns::create(&format!("{prefix}-gw"))?,
            backends: Vec::new(),
            dir,
            children: Vec::new(),
        };
        for i in 0..backends {
            lab.backends
                .push(Netns::create(&format!("{prefix}-b{}", i + 1))?);
        }
        lab.wire_up().context("wiring the lab's links")?;
        Ok(lab)
    }

    fn wire_up(&self) -> anyhow::Result<()> {
        let (gw, cl) = (&self.gateway, &self.client);
        veth(gw, "cl", cl)?;
        gw.ip(&["addr", "add", "10.0.1.1/24", "dev", "cl"])?;
        gw.ip(&["addr", "add", "fd00:1::1/64", "dev", "cl", "nodad"])?;
        gw.ip(&["link", "set", "cl", "up"])?;
        cl.ip(&["addr", "add", "10.0.1.2/24", "dev", "eth0"])?;
        cl.ip(&["addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad"])?;
        cl.ip(&["link", "set", "eth0", "up"])?;
        cl.ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        cl.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;

        // One veth per back end (no bridge): the gateway holds 10.0.2.1 /
        // fd00:2::1 on each and a host route to each back end through its own
        // link, as a gateway with a port per server would.
        for (i, be) in self.backends.iter().enumerate() {
            let port = format!("b{}", i + 1);
            veth(gw, &port, be)?;
            gw.ip(&["addr", "add", "10.0.2.1/32", "dev", &port])?;
            gw.ip(&["addr", "add", "fd00:2::1/128", "dev", &port, "nodad"])?;
            gw.ip(&["link", "set", &port, "up"])?;
            gw.ip(&["route", "add", &backend_v4(i).to_string(), "dev", &port])?;
            gw.ip(&[
                "-6",
                "route",
                "add",
                &backend_v6(i).to_string(),
                "dev",
                &port,
            ])?;
            be.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_v4(i)),
                "dev",
                "eth0",
            ])?;
            be.ip(&[
                "addr",
                "add",
                &format!("{}/64", backend_v6(i)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            be.ip(&["link", "set", "eth0", "up"])?;
            be.ip(&["route", "add", "default", "via", "10.0.2.1"])?;
            be.ip(&["-6", "route", "add", "default", "via", "fd00:2::1"])?;
        }
        Ok(())
    }

    /// A scratch directory that goes away with the lab.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts `fep-testsrv` on every back end (node name answered over HTTP
    /// on each TCP port and over UDP on each UDP port), and waits until each
    /// is listening.
    pub fn start_backend_servers(
        &mut self,
        testsrv: &Path,
        tcp: &[u16],
        udp: &[u16],
    ) -> anyhow::Result<()> {
        for i in 0..self.backends.len() {
            self.start_backend_server(i, testsrv, &testsrv_args(i, tcp, udp))?;
        }
        Ok(())
    }

    /// Starts `fep-testsrv ARGS` on back end `i` and waits until it listens.
    pub fn start_backend_server(
        &mut self,
        i: usize,
        testsrv: &Path,
        args: &[String],
    ) -> anyhow::Result<()> {
        let child = spawn_testsrv(&self.backends[i], &backend_name(i), testsrv, args)?;
        self.children.push((Some(i), child));
        Ok(())
    }

    /// fep's admin socket in this lab.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("fep.sock")
    }

    /// fep's `state_dir` in this lab.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A config for this lab: one node per back end (IPv6 addresses when
    /// `v6`), the admin socket and state directory inside the lab, and the
    /// given services and extra top-level keys (TOML, written by the caller;
    /// a key of the lab's defaults given there replaces the default).
    pub fn config(&self, v6: bool, top: &str, services: &str) -> String {
        self.config_with_nodes(self.backends.len(), v6, top, services)
    }

    /// As [`Lab::config`], with only the first `nodes` back ends as nodes.
    pub fn config_with_nodes(&self, nodes: usize, v6: bool, top: &str, services: &str) -> String {
        let fast_path = FAST_PATH
            .get()
            .then(|| ("fast_path", "\"tc-bpf\"".to_string()));
        let defaults = [
            ("tun", "\"fep0\"".to_string()),
            ("workers", "2".to_string()),
            ("route_idle_timeout_s", "30".to_string()),
            (
                "control_socket",
                format!("\"{}\"", self.control_socket().display()),
            ),
            ("state_dir", format!("\"{}\"", self.state_dir().display())),
        ]
        .into_iter()
        .chain(fast_path);
        let given = |key: &str| {
            top.lines()
                .any(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
        };
        let mut s = String::new();
        for (key, value) in defaults.filter(|(k, _)| !given(k)) {
            s.push_str(&format!("{key} = {value}\n"));
        }
        s.push_str(top);
        s.push('\n');
        for i in 0..nodes {
            let addr: IpAddr = if v6 {
                backend_v6(i).into()
            } else {
                backend_v4(i).into()
            };
            s.push_str(&format!(
                "\n[[node]]\nname = \"{}\"\naddress = \"{addr}\"\n",
                backend_name(i)
            ));
        }
        s.push('\n');
        s.push_str(services);
        s
    }

    /// Writes a fresh agent key into the lab (with `bep-agent --gen-key`).
    pub fn agent_key(&self, agent: &Path) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("agent.key");
        if !path.exists() {
            crate::netns::run(Command::new(agent).arg("--gen-key").arg(&path))?;
        }
        Ok(path)
    }

    /// Starts `bep-agent` on back end `i`, reporting to the fep on the
    /// gateway (10.0.2.1:9441) every `interval_ms`; `extra` is appended to
    /// its config (e.g. `[[service]]` commands).
    pub fn start_agent(
        &mut self,
        i: usize,
        agent: &Path,
        watch: &[u16],
        interval_ms: u64,
        extra: &str,
    ) -> anyhow::Result<()> {
        let key = self.agent_key(agent)?;
        let agent_cfg = AgentSpec {
            node: &backend_name(i),
            fep: "10.0.2.1:9441",
            key: &key,
            watch,
            interval_ms,
            extra,
        };
        let child = agent_cfg.spawn(&self.backends[i], &self.dir, agent)?;
        self.children.push((Some(i), child));
        Ok(())
    }

    /// Takes a process the caller started in one of the lab's namespaces,
    /// to be killed with the lab (or with back end `owner`).
    pub fn adopt(&mut self, owner: Option<usize>, child: Child) {
        self.children.push((owner, child));
    }

    /// Kills every process of back end `i` (server, agent): the node dies.
    pub fn kill_backend(&mut self, i: usize) {
        for (_, c) in self.children.iter_mut().filter(|(b, _)| *b == Some(i)) {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.retain(|(b, _)| *b != Some(i));
        self.kill_pidfiles(&format!("{}-", backend_name(i)));
    }

    /// Kills processes whose pid a start command wrote to `<prefix>*.pid` in
    /// the lab directory (services started by agents run detached).
    fn kill_pidfiles(&self, prefix: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(prefix) && name.ends_with(".pid") {
                if let Some(pid) = std::fs::read_to_string(e.path())
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill(2) on a pid our own start command recorded.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Starts fep in the gateway with `config` and waits until it serves.
    pub fn start_fep(&self, fep: &Path, config: &str) -> anyhow::Result<FepProcess> {
        self.start_fep_with(fep, config, &[])
    }

    /// As [`Lab::start_fep`], with extra command-line arguments.
    pub fn start_fep_with(
        &self,
        fep: &Path,
        config: &str,
        args: &[&str],
    ) -> anyhow::Result<FepProcess> {
        let mut p = self.spawn_fep(fep, config, args)?;
        p.wait_serving()?;
        let cfg = fep_shared::FepConfig::parse(config).context("the config fep serves")?;
        if cfg.fast_path == fep_shared::FastPath::TcBpf {
            let status: fep_shared::api::StatusView =
                crate::admin_client::get(&cfg.control_socket, "/v1/status")?;
            if status.fast_path.state != fep_shared::api::FastPathState::Running {
                bail!(
                    "fep serves, but not with the kernel fast path: {:?}",
                    status.fast_path
                );
            }
        }
        Ok(p)
    }

    /// Starts fep in the gateway with `config` (written to `fep.toml` in the
    /// lab) and `args`, logging to `fep.log`, without waiting for it.
    pub fn spawn_fep(&self, fep: &Path, config: &str, args: &[&str]) -> anyhow::Result<FepProcess> {
        FepProcess::spawn(&self.gateway, &self.dir, "fep", fep, config, args)
    }
}

/// Starts `fep-testsrv ARGS` in `ns` (for node `name`) and waits until it
/// listens.
pub fn spawn_testsrv(
    ns: &Netns,
    name: &str,
    testsrv: &Path,
    args: &[String],
) -> anyhow::Result<Child> {
    let mut child = ns
        .command(testsrv)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", testsrv.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("fep-testsrv on {name} did not start (said {line:?})");
    }
    Ok(child)
}

/// A `bep-agent` for node `node`, reporting to the fep at `fep` every
/// `interval_ms`; `extra` is appended to its config.
pub struct AgentSpec<'a> {
    pub node: &'a str,
    pub fep: &'a str,
    pub key: &'a Path,
    pub watch: &'a [u16],
    pub interval_ms: u64,
    pub extra: &'a str,
}

impl AgentSpec<'_> {
    /// Writes its config to `dir` and starts it in `ns`, logging to
    /// `dir/agent-NODE.log`.
    pub fn spawn(&self, ns: &Netns, dir: &Path, agent: &Path) -> anyhow::Result<Child> {
        let config = dir.join(format!("agent-{}.toml", self.node));
        std::fs::write(
            &config,
            format!(
                "node = \"{}\"\nfep = \"{}\"\nkey_file = \"{}\"\nreport_interval_ms = {}\nwatch_ports = {:?}\n{}\n",
                self.node,
                self.fep,
                self.key.display(),
                self.interval_ms,
                self.watch,
                self.extra
            ),
        )?;
        let log = std::fs::File::create(dir.join(format!("agent-{}.log", self.node)))?;
        ns.command(agent)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_pidfiles("");
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces are deleted as the fields drop.
    }
}

/// fep running in the gateway; killed if dropped while running.
pub struct FepProcess {
    child: Option<Child>,
    log_path: PathBuf,
}

impl FepProcess {
    /// Starts fep in `ns` with `config` (written to `dir/NAME.toml`) and
    /// `args`, logging to `dir/NAME.log`, without waiting for it.
    pub fn spawn(
        ns: &Netns,
        dir: &Path,
        name: &str,
        fep: &Path,
        config: &str,
        args: &[&str],
    ) -> anyhow::Result<FepProcess> {
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config)?;
        Self::spawn_file(ns, dir, name, fep, &config_path, args)
    }

    /// As [`FepProcess::spawn`], serving the config file at `config_path`
    /// as it is (an installed fep's own /etc/fep/fep.toml, say).
    pub fn spawn_file(
        ns: &Netns,
        dir: &Path,
        name: &str,
        fep: &Path,
        config_path: &Path,
        args: &[&str],
    ) -> anyhow::Result<FepProcess> {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = ns
            .command(fep)
            .arg("--config")
            .arg(config_path)
            .args(args)
            // Failed health checks too, which fep logs at debug.
            .env("RUST_LOG", "info,fep::control::health=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", fep.display()))?;
        Ok(FepProcess {
            child: Some(child),
            log_path,
        })
    }

    /// Waits up to 15 s until fep says it serves.
    pub fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().contains("serving") {
            if let Some(status) = self.child.as_mut().context("fep stopped")?.try_wait()? {
                bail!("fep exited with {status} before serving:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("fep did not start serving within 15 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// fep's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal to fep (e.g. `libc::SIGHUP` to reload).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// fep's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to 15 s for fep to exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(15)).context("after SIGTERM")
    }

    /// Waits up to `limit` for fep to exit; kills it (an error) after that.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("fep already stopped")?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("fep did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FepProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `fep-testsrv` arguments for back end `i`.
pub fn testsrv_args(i: usize, tcp: &[u16], udp: &[u16]) -> Vec<String> {
    let mut args = vec!["--name".to_string(), backend_name(i)];
    for p in tcp {
        args.extend(["--tcp".to_string(), p.to_string()]);
    }
    for p in udp {
        args.extend(["--udp".to_string(), p.to_string()]);
    }
    args
}

/// Finds a binary of the workspace next to the running executable (the
/// target directory of the current profile).
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace's binaries first (`cargo build --workspace --bins`, with --release for a release run)",
            path.display()
        );
    }
    Ok(path)
}

/// A veth pair from `port` in `from` to `eth0` in `to`.
pub(crate) fn veth(from: &Netns, port: &str, to: &Netns) -> anyhow::Result<()> {
    veth_to(from, port, to, "eth0")
}

/// A veth pair from `port` in `from` to `peer` in `to`.
pub(crate) fn veth_to(from: &Netns, port: &str, to: &Netns, peer: &str) -> anyhow::Result<()> {
    from.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        to.name(),
    ])
}
