//! `bep-agent` without root: config errors, key generation, and retrying
//! while the FEP is unreachable (on loopback).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("bep-agent-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bep-agent"))
}

/// `bep-agent --gen-key DIR/agent.key`, which must succeed; the key's path.
fn gen_key(d: &std::path::Path) -> std::path::PathBuf {
    let key = d.join("agent.key");
    assert!(agent()
        .arg("--gen-key")
        .arg(&key)
        .status()
        .unwrap()
        .success());
    key
}

#[test]
fn gen_key_writes_a_private_64_hex_key_once() {
    let key = gen_key(&dir("key"));
    let text = std::fs::read_to_string(&key).unwrap();
    assert_eq!(text.trim().len(), 64);
    assert!(text.trim().chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = agent().arg("--gen-key").arg(&key).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("must not exist yet"));
}

#[test]
fn a_bad_config_or_key_exits_2_naming_the_problem() {
    let d = dir("bad");
    let cfg = d.join("agent.toml");
    std::fs::write(&cfg, "node = \"be1\"\nfep = \"10.0.2.1:9441\"\nkey_file = \"/nonexistent\"\nreport_interval_ms = 5\n").unwrap();
    let out = agent().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("report_interval_ms"));

    std::fs::write(
        &cfg,
        "node = \"be1\"\nfep = \"10.0.2.1:9441\"\nkey_file = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = agent().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_file"));
}

#[test]
fn an_unreachable_fep_is_retried_with_backoff_and_the_agent_keeps_running() {
    let d = dir("retry");
    let key = d.join("agent.key");
    assert!(agent()
        .arg("--gen-key")
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let cfg = d.join("agent.toml");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &cfg,
        format!(
            "node = \"be1\"\nfep = \"127.0.0.1:1\"\nkey_file = \"{}\"\nwatch_ports = [80]\n",
            key.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("log")).unwrap();
    let mut child = agent()
        .arg("--config")
        .arg(&cfg)
        .stderr(log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Polled for (2 shared cores): the third attempt's back-off, once the
    // first two were logged.
    let read_log = || std::fs::read_to_string(d.join("log")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !read_log().contains("reconnecting in 1000 ms") {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the agent must not exit on its own: {}",
            read_log()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no third retry within 30 s: {}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent must not exit on its own"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let log = read_log();
    assert!(
        log.contains("cannot connect") && log.contains("reconnecting in 250 ms"),
        "{log}"
    );
    let at = |what: &str| log.find(what).unwrap_or_else(|| panic!("{what}: {log}"));
    assert!(
        at("reconnecting in 250 ms") < at("reconnecting in 500 ms")
            && at("reconnecting in 500 ms") < at("reconnecting in 1000 ms"),
        "backoff doubles: {log}"
    );
}

#[test]
fn check_reads_the_shipped_config_and_its_key_and_names_a_missing_key() {
    let d = dir("check");
    let key = gen_key(&d);
    // The package's /etc/fep/bep-agent.toml, with its key in this directory.
    let shipped = include_str!("../../deploy/bep-agent.toml");
    let cfg = d.join("bep-agent.toml");
    std::fs::write(
        &cfg,
        shipped.replace("/etc/fep/agent.key", key.to_str().unwrap()),
    )
    .unwrap();
    let check = || {
        agent()
            .arg("--config")
            .arg(&cfg)
            .arg("--check")
            .output()
            .unwrap()
    };
    let out = check();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "config OK: node be1 reports to 192.0.2.1:9441 every 1000 ms (key {})\nwatch port 80\n",
            key.display()
        )
    );
    std::fs::remove_file(&key).unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key_file"));
}
