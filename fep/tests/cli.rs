//! The `fep` command line without root: config validation and `--check`.

use std::process::Command;

fn fep(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fep"))
        .args(args)
        .output()
        .unwrap()
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fep-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"
tun = "fep7"
[[node]]
name = "be1"
address = "10.0.2.11"
[[node]]
name = "be2"
address = "10.0.2.12"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
backend = [{ node = "be1", ratio = 2 }, { node = "be2", ratio = 1, port = 8080 }]
"#;

#[test]
fn check_prints_what_would_be_served() {
    let path = write_config("good.toml", GOOD);
    let out = fep(&["--config", path.to_str().unwrap(), "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("config OK: tun fep7"), "{stdout}");
    assert!(
        stdout.contains("service web: tcp 10.0.0.100:80, scheduler ratio"),
        "{stdout}"
    );
    assert!(stdout.contains("10.0.2.12:8080"), "{stdout}");
    assert!(stdout.contains("66.7% of new routes"), "{stdout}");
}

#[test]
fn an_invalid_config_names_the_key_and_exits_2() {
    let path = write_config(
        "bad.toml",
        &GOOD.replace("node = \"be2\", ratio", "node = \"be9\", ratio"),
    );
    for extra in [&["--check"][..], &[]] {
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = fep(&args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("service[0].backend[1].node")
                && stderr.contains("no node 'be9' (nodes: be1, be2)"),
            "{stderr}"
        );
    }
}

#[test]
fn a_missing_or_garbled_file_exits_2_with_the_reason() {
    let out = fep(&["--config", "/nonexistent/fep.toml", "--check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config file '/nonexistent/fep.toml'"));

    let path = write_config("garbled.toml", "workers = [\n");
    let out = fep(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not valid TOML"));
}
