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
fn check_says_whether_the_kernel_fast_path_and_an_affinity_group_are_in_force() {
    let text = format!("fast_path = \"tc-bpf\"\n{GOOD}").replace(
        "protocol = \"tcp\"\n",
        "protocol = \"tcp\"\naffinity_group = \"pair\"\n",
    );
    let path = write_config("fast.toml", &text);
    let out = fep(&["--config", path.to_str().unwrap(), "--check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // `tools/install-build-deps` gave the build clang to compile it with.
    assert!(
        stdout.contains("fast path: tc-bpf (established routes forwarded in the kernel)"),
        "{stdout}"
    );
    assert!(stdout.contains("affinity client (group pair)"), "{stdout}");
}

/// fep with the config at `path`, with and without `--check`: exit status 2
/// and every one of `wants` in the message.
fn refused_with_and_without_check(path: &std::path::Path, wants: &[&str]) {
    for extra in [&["--check"][..], &[]] {
        let mut args = vec!["--config", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = fep(&args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for want in wants {
            assert!(stderr.contains(want), "{want:?} in {stderr}");
        }
    }
}

#[test]
fn an_invalid_config_names_the_key_and_exits_2() {
    let path = write_config(
        "bad.toml",
        &GOOD.replace("node = \"be2\", ratio", "node = \"be9\", ratio"),
    );
    refused_with_and_without_check(
        &path,
        &[
            "service[0].backend[1].node",
            "no node 'be9' (nodes: be1, be2)",
        ],
    );
}

#[test]
fn check_reads_the_key_files_the_config_names() {
    let sites = format!(
        "{GOOD}\n[sites]\nme = \"a\"\nkey_file = \"/nonexistent/sites.key\"\nlisten = \"10.0.0.1:7400\"\n\
         [[sites.site]]\nname = \"a\"\nexchange = \"10.0.0.1:7400\"\n"
    );
    let path = write_config("sites-nokey.toml", &sites);
    let out = fep(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sites.key_file") && stderr.contains("/nonexistent/sites.key"),
        "{stderr}"
    );
    let key = write_config("sites.key", &"ab".repeat(32));
    let with_key = sites.replace("/nonexistent/sites.key", key.to_str().unwrap());
    let path = write_config("sites-key.toml", &with_key);
    let out = fep(&["--config", path.to_str().unwrap(), "--check"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("sites: this is 'a' of 1"));
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

#[test]
fn a_name_longer_than_a_route_snapshot_holds_is_refused() {
    let long = "b".repeat(256);
    let path = write_config(
        "long-name.toml",
        &GOOD.replace("\"be2\"", &format!("\"{long}\"")),
    );
    refused_with_and_without_check(
        &path,
        &["config key `node[1].name`: is 256 bytes long; names are at most 255 bytes"],
    );
    let ok = write_config(
        "longest-name.toml",
        &GOOD.replace("\"be2\"", &format!("\"{}\"", &long[1..])),
    );
    assert!(fep(&["--config", ok.to_str().unwrap(), "--check"])
        .status
        .success());
}

#[test]
fn a_damaged_state_file_stops_fep_before_it_sets_anything_up() {
    let dir = std::env::temp_dir().join(format!("fep-cli-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    std::fs::write(&state, "{\"version\": 1, \"live\": {").unwrap();
    let path = write_config(
        "state.toml",
        &format!("state_dir = \"{}\"\n{GOOD}", dir.display()),
    );
    let out = fep(&["--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{} is damaged", state.display()))
            && stderr.contains(
                "restore it from a backup (state.json), or start fep with --discard-state"
            ),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\": 1, \"live\": {",
        "left as it was"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_config_passes_check_once_its_agent_key_exists() {
    let shipped = include_str!("../../deploy/fep.toml");
    let path = write_config(
        "shipped-nokey.toml",
        &shipped.replace("/etc/fep/", "/nonexistent/"),
    );
    let out = fep(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent_key_file"));
    let key = write_config("shipped-agent.key", &"cd".repeat(32));
    let path = write_config(
        "shipped.toml",
        &shipped.replace("/etc/fep/agent.key", key.to_str().unwrap()),
    );
    let out = fep(&["--config", path.to_str().unwrap(), "--check"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("service web: tcp 192.0.2.10:80, scheduler ratio, affinity port"),
        "{stdout}"
    );
    assert!(
        stdout.contains("192.0.2.22:80") && stdout.contains("50.0% of new routes"),
        "{stdout}"
    );
}

#[test]
fn generate_docs_writes_the_man_page_and_completions() {
    let dir = std::env::temp_dir().join(format!("fep-cli-docs-{}", std::process::id()));
    let out = fep(&["--generate-docs", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(dir.join("man/fep.1")).unwrap();
    assert!(
        page.contains("discard\\-state") && page.contains("/etc/fep/fep.toml"),
        "{page}"
    );
    assert!(std::fs::read_to_string(dir.join("bash/fep"))
        .unwrap()
        .contains("--cleanup"));
    std::fs::remove_dir_all(&dir).unwrap();
}
