//! `bep-agent --config PATH [--check]`: the back-end agent.
//!
//! Connects to the FEP (retrying with backoff while it is unreachable),
//! authenticates, registers as its node, and then:
//! - reports CPU, load average and, per watched port, listening state, live
//!   connections and received packets per second every `report_interval_ms`,
//!   and at once when a watched port starts or stops listening;
//! - answers "which of these connections are live?" from the kernel's socket
//!   table (netlink sock_diag);
//! - keeps the copies of UDP routes to this node that front ends send, and
//!   lists them with its live connections to a front end taking over;
//! - runs a service's `start` / `stop` command when the FEP asks (killed
//!   and reported failed after `command_timeout_s`), and says when the port
//!   listens.
//!
//! `bep-agent --gen-key PATH` writes a new shared key for `key_file` and the
//! FEP's `agent_key_file`; `bep-agent --derive-key MASTER --node NAME PATH`
//! writes node NAME's own key, derived from that one.

mod copies;
mod load;
mod sockdiag;

use std::collections::HashSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use copies::RouteCopies;
use fep_shared::protocol::{io, AgentMsg, ConnId, FepMsg, Key, Session, MAX_CONNS_PER_FRAME};
use fep_shared::AgentConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How often the listening state of watched ports is checked between reports.
const WATCH_EVERY: Duration = Duration::from_millis(200);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a started service may take to listen.
const START_LISTEN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(version, about = "Back-end agent of the fep cluster dispatcher")]
struct Args {
    /// Path of the agent's TOML config file.
    #[arg(long, required_unless_present_any = ["gen_key", "derive_key", "generate_docs"])]
    config: Option<PathBuf>,
    /// Validate the config and read its key file, print what the agent
    /// would report and to whom, and exit (status 2 naming what is wrong).
    #[arg(long, requires = "config")]
    check: bool,
    /// Write a new random shared key (64 hex characters, mode 0600) to this file and exit.
    #[arg(long, value_name = "PATH")]
    gen_key: Option<PathBuf>,
    /// Write the key of node `--node`, derived from the shared key in
    /// MASTER, to PATH (mode 0600) and exit: a back end holding only its
    /// own key can speak for no other node.
    #[arg(long, num_args = 2, value_names = ["MASTER", "PATH"], requires = "node")]
    derive_key: Option<Vec<PathBuf>>,
    /// The node whose key `--derive-key` writes.
    #[arg(long)]
    node: Option<String>,
    /// Write the man page and shell completions to DIR, and exit (the
    /// package's build runs this).
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    generate_docs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        return fep_shared::cli_docs::generate(Args::command(), dir);
    }
    fep_shared::init_logging();
    let new_key = match (&args.gen_key, &args.derive_key, &args.node) {
        (Some(path), _, _) => Some((path.clone(), Ok(Key::generate_hex()))),
        (None, Some(paths), Some(node)) => Some((
            paths[1].clone(),
            Key::load(&paths[0]).map(|master| master.derive(node).to_hex()),
        )),
        _ => None,
    };
    if let Some((path, key)) = new_key {
        let written = key
            .map_err(|e| anyhow::anyhow!(e))
            .and_then(|k| write_key(&path, &k));
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bep-agent: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let path = args
        .config
        .expect("clap requires --config without --gen-key, --derive-key or --generate-docs");
    let cfg = match AgentConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bep-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let key = match Key::load(&cfg.key_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("bep-agent: config key `key_file`: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        print!("{}", describe(&cfg));
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bep-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cfg, key));
    ExitCode::SUCCESS
}

/// What `--check` prints: the agent's node, its front end and what it reports.
fn describe(cfg: &AgentConfig) -> String {
    let mut out = format!(
        "config OK: node {} reports to {} every {} ms (key {})\n",
        cfg.node,
        cfg.fep,
        cfg.report_interval_ms,
        cfg.key_file.display()
    );
    for port in &cfg.watch_ports {
        let commands = match cfg.service(*port) {
            Some(s) if s.start.is_some() || s.stop.is_some() => ", start/stop commands",
            _ => "",
        };
        out.push_str(&format!("watch port {port}{commands}\n"));
    }
    out
}

fn write_key(path: &std::path::Path, hex: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create key file {} (it must not exist yet)",
                path.display()
            )
        })?;
    std::io::Write::write_all(&mut f, format!("{hex}\n").as_bytes())?;
    Ok(())
}

/// Connects, serves, and reconnects with backoff; never returns.
async fn run(cfg: AgentConfig, key: Key) {
    let mut backoff = MIN_BACKOFF;
    let mut copies = RouteCopies::default();
    loop {
        match session(&cfg, key.clone(), &mut backoff, &mut copies).await {
            Ok(()) => tracing::warn!("the fep at {} closed the connection", cfg.fep),
            Err(e) => tracing::warn!("fep at {}: {e:#}", cfg.fep),
        }
        tracing::info!("reconnecting in {} ms", backoff.as_millis());
        tokio::time::sleep(backoff).await;
        backoff = next_backoff(backoff);
    }
}

/// The wait before the next attempt: doubling, at most [`MAX_BACKOFF`].
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(MAX_BACKOFF)
}

/// One connection; `backoff` starts afresh once it is registered, so that a
/// restarted fep is found again quickly. `copies` outlive it.
async fn session(
    cfg: &AgentConfig,
    key: Key,
    backoff: &mut Duration,
    copies: &mut RouteCopies,
) -> anyhow::Result<()> {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(cfg.fep))
        .await
        .context("connect timed out")?
        .context("cannot connect")?;
    let mut session = io::handshake(&mut stream, key, Duration::from_secs(5)).await?;
    let (rd, mut wr) = stream.into_split();
    let send = |session: &mut Session, msg: &AgentMsg| session.seal(msg);
    wr.write_all(&send(
        &mut session,
        &AgentMsg::Register {
            node: cfg.node.clone(),
        },
    ))
    .await?;
    tracing::info!("connected to the fep at {} as node '{}'", cfg.fep, cfg.node);
    *backoff = MIN_BACKOFF;

    let (frames_tx, mut frames) = mpsc::channel(64);
    let reader = tokio::spawn(io::read_frames(rd, frames_tx));
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut sampler = load::Sampler::default();
    let mut report = tokio::time::interval(Duration::from_millis(cfg.report_interval_ms));
    let mut watch = tokio::time::interval(WATCH_EVERY);
    let mut listening = load::listening(&cfg.watch_ports);

    let result = loop {
        let msgs = tokio::select! {
            frame = frames.recv() => match frame {
                Some(Ok(bytes)) => match session.open::<FepMsg>(&bytes) {
                    Ok(msg) => handle(cfg, msg, copies, &done_tx),
                    Err(e) => break Err(anyhow::anyhow!("rejected a frame from the fep: {e}")),
                },
                Some(Err(e)) => break Err(anyhow::anyhow!("rejected a frame from the fep: {e}")),
                None => break Ok(()),
            },
            Some(msg) = done.recv() => vec![msg],
            _ = report.tick() => vec![AgentMsg::Report(sampler.sample(&cfg.watch_ports))],
            _ = watch.tick() => {
                let now = load::listening(&cfg.watch_ports);
                if now != listening {
                    tracing::info!("watched ports {:?} listening: {now:?} (was {listening:?}); reporting at once", cfg.watch_ports);
                    listening = now;
                    vec![AgentMsg::Report(sampler.sample(&cfg.watch_ports))]
                } else {
                    Vec::new()
                }
            }
        };
        let mut failed = None;
        for msg in msgs {
            if let Err(e) = wr.write_all(&send(&mut session, &msg)).await {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e.into());
        }
    };
    reader.abort();
    result
}

/// Handles one FEP message; a query is answered at once (a live list in
/// frame-sized parts), commands report their result through `done` when
/// they finish.
fn handle(
    cfg: &AgentConfig,
    msg: FepMsg,
    copies: &mut RouteCopies,
    done: &mpsc::UnboundedSender<AgentMsg>,
) -> Vec<AgentMsg> {
    match msg {
        FepMsg::Query { id, conns } => vec![AgentMsg::Live {
            id,
            live: live_of(&conns),
        }],
        FepMsg::ListLive { ports, udp_ports } => {
            let conns: Vec<ConnId> = live_table()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| ports.contains(&c.port))
                .collect();
            live_list_parts(conns, copies.on_ports(&udp_ports))
        }
        FepMsg::KeepRoutes { conns } => {
            let refused = copies.keep(&conns);
            if refused > 0 {
                tracing::warn!(
                    "refused {refused} UDP route copies: {} are kept, the most there is room \
                     for ({} refused since the start); those flows get a new back end if \
                     their front end fails",
                    copies.len(),
                    copies.refused()
                );
            }
            Vec::new()
        }
        FepMsg::ForgetRoutes { conns } => {
            copies.forget(&conns);
            Vec::new()
        }
        FepMsg::Start { port } | FepMsg::Stop { port } => {
            let start = matches!(msg, FepMsg::Start { .. });
            let command = cfg.service(port).and_then(|s| {
                if start {
                    s.start.clone()
                } else {
                    s.stop.clone()
                }
            });
            let done = done.clone();
            let limit = Duration::from_secs(cfg.command_timeout_s);
            tokio::spawn(async move {
                let (ok, message) = match command {
                    Some(cmd) => control(&cmd, port, start, limit).await,
                    None => (
                        false,
                        format!(
                            "no {} command configured for port {port}",
                            if start { "start" } else { "stop" }
                        ),
                    ),
                };
                let _ = done.send(AgentMsg::Control {
                    port,
                    start,
                    ok,
                    message,
                });
            });
            Vec::new()
        }
    }
}

/// A live list as frames of at most [`MAX_CONNS_PER_FRAME`]: the TCP
/// connections, then the kept UDP routes, the last frame marked `done` (one
/// empty frame for none at all).
fn live_list_parts(tcp: Vec<ConnId>, udp: Vec<ConnId>) -> Vec<AgentMsg> {
    let mut parts: Vec<AgentMsg> = [(tcp, false), (udp, true)]
        .iter()
        .flat_map(|(conns, udp)| {
            conns
                .chunks(MAX_CONNS_PER_FRAME)
                .map(|c| AgentMsg::LiveList {
                    conns: c.to_vec(),
                    udp: *udp,
                    done: false,
                })
        })
        .collect();
    match parts.last_mut() {
        Some(AgentMsg::LiveList { done, .. }) => *done = true,
        _ => parts.push(AgentMsg::LiveList {
            conns: Vec::new(),
            udp: false,
            done: true,
        }),
    }
    parts
}

/// Every live TCP connection in this host's socket table.
fn live_table() -> std::io::Result<HashSet<ConnId>> {
    Ok(sockdiag::tcp(sockdiag::live_tcp_states(), false)?
        .into_iter()
        .map(|s| ConnId {
            client: s.remote,
            client_port: s.remote_port,
            port: s.local_port,
        })
        .collect())
}

/// Which of `conns` have a live TCP connection in this host's socket table.
fn live_of(conns: &[ConnId]) -> Vec<ConnId> {
    live_in(conns, live_table())
}

/// Which of `conns` are in `table`; all of them when the table could not
/// be read: unknown is not idle, so nothing is pruned on a guess.
fn live_in(conns: &[ConnId], table: std::io::Result<HashSet<ConnId>>) -> Vec<ConnId> {
    let table = match table {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("sock_diag failed ({e}); answering that every asked connection is live");
            return conns.to_vec();
        }
    };
    conns
        .iter()
        .filter(|c| table.contains(c))
        .copied()
        .collect()
}

/// Runs a start or stop command, killed (with its process group) when it
/// has not returned within `limit`; a start succeeds once the port listens.
async fn control(cmd: &str, port: u16, start: bool, limit: Duration) -> (bool, String) {
    tracing::info!(
        "running {} command for port {port}: {cmd}",
        if start { "start" } else { "stop" }
    );
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run `{cmd}`: {e}")),
    };
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(s)) if s.success() => {}
        Ok(Ok(s)) => return (false, format!("`{cmd}` exited with {s}")),
        Ok(Err(e)) => return (false, format!("cannot run `{cmd}`: {e}")),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the process group of our own child.
                unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            }
            let _ = child.wait().await;
            return (
                false,
                format!(
                    "`{cmd}` did not return within {} s (command_timeout_s): killed",
                    limit.as_secs()
                ),
            );
        }
    }
    if !start {
        return (true, format!("`{cmd}` done"));
    }
    let deadline = tokio::time::Instant::now() + START_LISTEN_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if load::listening(&[port])[0] {
            return (true, format!("port {port} is listening"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (
        false,
        format!("`{cmd}` ran but port {port} did not listen within 15 s"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_list_goes_in_frame_sized_parts_the_last_marked_done() {
        let conn = |n: usize| ConnId {
            client: [10, 0, (n >> 16) as u8, (n >> 8) as u8].into(),
            client_port: n as u16,
            port: 80,
        };
        let conns: Vec<ConnId> = (0..2 * MAX_CONNS_PER_FRAME + 5).map(conn).collect();
        let udp: Vec<ConnId> = (0..3).map(conn).collect();
        let sizes_of = |parts: &[AgentMsg]| -> Vec<(usize, bool, bool)> {
            parts
                .iter()
                .map(|m| match m {
                    AgentMsg::LiveList { conns, udp, done } => (conns.len(), *udp, *done),
                    other => panic!("not a live list: {other:?}"),
                })
                .collect()
        };
        let parts = live_list_parts(conns.clone(), udp.clone());
        assert_eq!(
            sizes_of(&parts),
            [
                (MAX_CONNS_PER_FRAME, false, false),
                (MAX_CONNS_PER_FRAME, false, false),
                (5, false, false),
                (3, true, true)
            ]
        );
        let joined: Vec<ConnId> = parts
            .into_iter()
            .flat_map(|m| match m {
                AgentMsg::LiveList { conns, .. } => conns,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(joined, [conns.clone(), udp].concat());
        assert_eq!(
            sizes_of(&live_list_parts(conns[..5].to_vec(), Vec::new())),
            [(5, false, true)]
        );
        assert_eq!(
            live_list_parts(Vec::new(), Vec::new()),
            [AgentMsg::LiveList {
                conns: Vec::new(),
                udp: false,
                done: true
            }]
        );
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_and_reported_failed() {
        let started = std::time::Instant::now();
        let (ok, message) = control("sleep 30", 80, true, Duration::from_secs(1)).await;
        assert!(!ok);
        assert!(message.contains("did not return within 1 s"), "{message}");
        assert!(started.elapsed() < Duration::from_secs(20));
        let (ok, message) = control("exit 3", 80, false, Duration::from_secs(10)).await;
        assert!(!ok && message.contains("exited with"), "{message}");
        let (ok, _) = control("true", 80, false, Duration::from_secs(10)).await;
        assert!(ok);
    }

    #[test]
    fn reconnect_attempts_wait_250_ms_doubling_to_at_most_10_s() {
        let waits: Vec<u128> = std::iter::successors(Some(MIN_BACKOFF), |&b| Some(next_backoff(b)))
            .take(9)
            .map(|d| d.as_millis())
            .collect();
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn an_unreadable_socket_table_answers_that_every_asked_connection_is_live() {
        let conn = |port| ConnId {
            client: [192, 0, 2, 1].into(),
            client_port: port,
            port: 80,
        };
        let asked = [conn(1000), conn(1001)];
        let failed = Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(live_in(&asked, failed), asked);
        let table = HashSet::from([conn(1001), conn(2000)]);
        assert_eq!(live_in(&asked, Ok(table)), [conn(1001)]);
        assert_eq!(live_in(&asked, Ok(HashSet::new())), []);
    }

    /// A loopback connection: (client, the server's accepted socket), and
    /// the connection as the agent is asked about it.
    fn loopback_connection() -> (std::net::TcpStream, std::net::TcpStream, ConnId) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let conn = ConnId {
            client: [127, 0, 0, 1].into(),
            client_port: client.local_addr().unwrap().port(),
            port: server.local_addr().unwrap().port(),
        };
        (client, server, conn)
    }

    /// Polls (at most 5 s) until `conn`'s liveness is `live`.
    fn becomes(conn: ConnId, live: bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if live_of(&[conn]).contains(&conn) == live {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn a_closed_connection_is_not_live_and_time_wait_does_not_count() {
        use std::io::Read;
        // Closed by the client: live while the server still holds it
        // (CLOSE_WAIT), over once the server closes too.
        let (client, mut server, conn) = loopback_connection();
        assert!(becomes(conn, true), "an open connection is live");
        drop(client);
        assert_eq!(server.read(&mut [0; 8]).unwrap(), 0, "the client's FIN");
        assert!(becomes(conn, true), "CLOSE_WAIT: the server may still send");
        drop(server);
        assert!(
            becomes(conn, false),
            "closed by the client, then the server"
        );

        // Closed by the server first: its side lingers in TIME_WAIT, which
        // is not live.
        let (mut client, server, conn) = loopback_connection();
        drop(server);
        assert_eq!(client.read(&mut [0; 8]).unwrap(), 0, "the server's FIN");
        drop(client);
        let in_time_wait = || {
            sockdiag::tcp(netlink_packet_sock_diag::inet::StateFlags::TIME_WAIT, false)
                .unwrap()
                .iter()
                .any(|s| s.local_port == conn.port && s.remote_port == conn.client_port)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !in_time_wait() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(in_time_wait(), "the server's socket is in TIME_WAIT");
        assert!(live_of(&[conn]).is_empty(), "TIME_WAIT is not live");
    }
}
