//! The Debian package as an operator meets it: `tools/build-deb` builds it,
//! `dpkg -i` installs it (in a private overlay, below), and the installed
//! files are what they say (modes, conffiles, units that `systemd-analyze
//! verify` accepts with the installed paths, `--check` on the shipped
//! configs, man pages and completions). The installed fep then serves a VIP in a namespace
//! topology from the shipped /etc/fep/fep.toml with the lab's addresses
//! filled in, the installed bep-agent reports from the shipped
//! bep-agent.toml, and the installed fepctl reads both through the default
//! socket. An upgrade keeps the edited config; removal leaves /etc/fep
//! alone; purge removes everything.
//!
//! All that dpkg and the package do to the machine happens in a private
//! overlay of /etc, /usr, /var and /run (a mount namespace of the test's
//! own, gone when the test ends, passed or not), with systemd hidden from
//! the maintainer scripts: the machine's own packages, configs and services
//! are never touched, and a fep package installed on it is no obstacle.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fep_shared::api::NodeView;
use fep_tests::{http_names, skip_without_root, tally, wait_for, Running};
use fep_tools::host;
use fep_tools::lab::{self, backend_v4, FepProcess, Lab, VIP_V4};
use fep_tools::netns::output;

const PACKAGE: &str = "fep";
const CONFIG: &str = "/etc/fep/fep.toml";
const AGENT_CONFIG: &str = "/etc/fep/bep-agent.toml";
const KEY: &str = "/etc/fep/agent.key";
const STATE_DIR: &str = "/var/lib/fep";
const UNITS: [&str; 2] = [
    "/usr/lib/systemd/system/fep.service",
    "/usr/lib/systemd/system/bep-agent.service",
];
/// The example addresses of the shipped configs and the lab's in their place.
fn lab_addresses() -> [(&'static str, String); 4] {
    [
        ("192.0.2.10", VIP_V4.to_string()),
        ("192.0.2.21", backend_v4(0).to_string()),
        ("192.0.2.22", backend_v4(1).to_string()),
        ("192.0.2.1:9441", "10.0.2.1:9441".to_string()),
    ]
}

fn dpkg(args: &[&str]) -> String {
    output(
        Command::new("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .unwrap()
}

/// The package's state in dpkg's database ("" when unknown to it).
fn dpkg_status() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}${Version}", PACKAGE])
        .output()
        .expect("running dpkg-query");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `tools/build-deb ARGS`; the package it wrote (cargo-deb's last line).
fn build(args: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = output(Command::new(root.join("tools/build-deb")).args(args)).unwrap();
    let deb = PathBuf::from(text.lines().last().unwrap_or("").trim());
    assert!(
        deb.extension().is_some_and(|e| e == "deb") && deb.exists(),
        "tools/build-deb wrote no package: {text}"
    );
    deb
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

/// Moves the calling thread (and what it starts) into a mount namespace
/// of its own where /etc, /usr, /var and /run are overlays whose changes
/// go to a tmpfs at `scratch`, and /run/systemd is an empty tmpfs (so the
/// maintainer scripts find no systemd to talk to).
fn enter_private_overlay(scratch: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    let c = |s: &str| CString::new(s).unwrap();
    let mount = |src: &str, target: &Path, fstype: &str, flags: libc::c_ulong, data: &str| {
        let (src, target, fstype, data) = (c(src), c(target.to_str().unwrap()), c(fstype), c(data));
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(std::io::Error::new(
                e.kind(),
                format!("mount {target:?}: {e}"),
            ))
        }
    };
    // SAFETY: unshare(2) of this thread's mount namespace (and with it its
    // filesystem attributes); no memory is involved.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )?;
    std::fs::create_dir_all(scratch)?;
    mount("tmpfs", scratch, "tmpfs", 0, "mode=0755")?;
    for dir in ["etc", "usr", "var", "run"] {
        let (upper, work) = (
            scratch.join(dir).join("upper"),
            scratch.join(dir).join("work"),
        );
        std::fs::create_dir_all(&upper)?;
        std::fs::create_dir_all(&work)?;
        let options = format!(
            "lowerdir=/{dir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount("overlay", &Path::new("/").join(dir), "overlay", 0, &options)?;
    }
    std::fs::create_dir_all("/run/systemd")?;
    mount("tmpfs", Path::new("/run/systemd"), "tmpfs", 0, "mode=0755")
}

#[test]
fn the_package_installs_serves_a_vip_upgrades_and_removes_cleanly() {
    if skip_without_root("the_package_installs_serves_a_vip_upgrades_and_removes_cleanly") {
        return;
    }
    // What the test needs stays installed, as the other tests' tools do.
    host::ensure(&[host::DPKG_SHLIBDEPS, host::SYSTEMD_ANALYZE]).unwrap();
    host::prepare_lab().unwrap();
    let out = std::env::temp_dir().join(format!("fep-package-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    // cargo-deb deletes every fep_*.deb in TARGET/debian when it builds one
    // (even with --output): those an operator built are put back.
    let debian = lab::workspace_bin("fep")
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("debian");
    let kept: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&debian)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    let first = build(&["--output", out.join("first.deb").to_str().unwrap()]);
    let second = build(&[
        "--deb-revision",
        "2",
        "--output",
        out.join("second.deb").to_str().unwrap(),
    ]);
    for (path, bytes) in &kept {
        std::fs::write(path, bytes).unwrap();
    }
    let scratch = out.join("overlay");
    let test = std::thread::spawn(move || {
        enter_private_overlay(&scratch).expect("a private overlay of /etc, /usr, /var and /run");
        install_serve_upgrade_remove(&first, &second);
    });
    if let Err(panic) = test.join() {
        std::panic::resume_unwind(panic);
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// The test proper, in the private overlay.
fn install_serve_upgrade_remove(first: &Path, second: &Path) {
    // As on a machine that never had it (in the overlay only).
    if !dpkg_status().is_empty() {
        dpkg(&["--purge", PACKAGE]);
    }
    for dir in ["/etc/fep", STATE_DIR] {
        if Path::new(dir).exists() {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
    dpkg(&["--install", first.to_str().unwrap()]);
    assert!(dpkg_status().starts_with("ii"), "{}", dpkg_status());

    // What is installed, and with which modes.
    for bin in ["/usr/bin/fep", "/usr/bin/bep-agent", "/usr/bin/fepctl"] {
        assert_eq!(mode(bin), 0o755, "{bin}");
        assert_eq!(
            std::fs::metadata(bin).unwrap().uid(),
            0,
            "{bin} owned by root"
        );
    }
    for file in [CONFIG, AGENT_CONFIG] {
        assert_eq!(mode(file), 0o644, "{file}");
    }
    assert_eq!(mode("/etc/fep"), 0o755);
    assert_eq!(mode(KEY), 0o600, "the master key postinst made is private");
    let key = std::fs::read_to_string(KEY).unwrap();
    assert_eq!(key.trim().len(), 64, "{key}");
    assert_eq!(mode(STATE_DIR), 0o700);
    let conffiles =
        output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE])).unwrap();
    for file in [CONFIG, AGENT_CONFIG] {
        assert!(
            conffiles.contains(file),
            "{file} is no conffile: {conffiles}"
        );
    }
    for page in [
        "fep",
        "bep-agent",
        "fepctl",
        "fepctl-drain",
        "fepctl-explain",
    ] {
        let path = format!("/usr/share/man/man1/{page}.1.gz");
        assert_eq!(mode(&path), 0o644, "{path}");
    }
    for bin in ["fep", "bep-agent", "fepctl"] {
        for path in [
            format!("/usr/share/bash-completion/completions/{bin}"),
            format!("/usr/share/zsh/vendor-completions/_{bin}"),
            format!("/usr/share/fish/vendor_completions.d/{bin}.fish"),
        ] {
            assert!(
                std::fs::read_to_string(&path).is_ok_and(|t| t.contains(bin)),
                "{path}"
            );
        }
    }
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/fepctl").unwrap();
    assert!(bash.contains("drain") && bash.contains("explain"), "{bash}");

    // The units name the installed binaries and configs, and systemd accepts them.
    for unit in UNITS {
        let text = std::fs::read_to_string(unit).unwrap();
        assert!(!text.contains("/usr/local"), "{unit}:\n{text}");
        output(Command::new("systemd-analyze").arg("verify").arg(unit)).unwrap();
    }
    assert!(std::fs::read_to_string(UNITS[0])
        .unwrap()
        .contains("ExecStart=/usr/bin/fep --config /etc/fep/fep.toml\n"));

    // The shipped configs pass their checks as installed.
    let check = output(Command::new("/usr/bin/fep").args(["--config", CONFIG, "--check"])).unwrap();
    assert!(check.contains("service web: tcp 192.0.2.10:80"), "{check}");
    let check =
        output(Command::new("/usr/bin/bep-agent").args(["--config", AGENT_CONFIG, "--check"]))
            .unwrap();
    assert!(check.contains("config OK: node be1"), "{check}");

    // The operator's edit: the lab's addresses in place of the examples.
    for path in [CONFIG, AGENT_CONFIG] {
        let mut text = std::fs::read_to_string(path).unwrap();
        for (example, ours) in lab_addresses() {
            text = text.replace(example, &ours);
        }
        std::fs::write(path, text).unwrap();
    }
    let edited = std::fs::read_to_string(CONFIG).unwrap();

    serve_from_the_installed_files();

    // An upgrade keeps the edited config (and the key) without asking.
    dpkg(&["--install", second.to_str().unwrap()]);
    assert!(dpkg_status().ends_with("0.1.0-2"), "{}", dpkg_status());
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited);
    assert_eq!(std::fs::read_to_string(KEY).unwrap(), key);
    for leftover in ["/etc/fep/fep.toml.dpkg-dist", "/etc/fep/fep.toml.dpkg-new"] {
        assert!(!Path::new(leftover).exists(), "{leftover}");
    }

    // Removal takes the programs and leaves /etc/fep and the state alone.
    dpkg(&["--remove", PACKAGE]);
    assert!(dpkg_status().starts_with("rc"), "{}", dpkg_status());
    for gone in ["/usr/bin/fep", "/usr/bin/fepctl", UNITS[0]] {
        assert!(!Path::new(gone).exists(), "{gone} left after removal");
    }
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), edited);
    assert_eq!(std::fs::read_to_string(KEY).unwrap(), key);
    assert!(Path::new(STATE_DIR).is_dir());

    // Purge removes the rest.
    dpkg(&["--purge", PACKAGE]);
    assert!(dpkg_status().is_empty(), "{}", dpkg_status());
    for gone in ["/etc/fep", STATE_DIR] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
}

/// The installed fep serves the edited /etc/fep/fep.toml in a lab's gateway
/// (state in /var/lib/fep, admin socket /run/fep/fep.sock), the installed
/// agent reports for be1 from /etc/fep/bep-agent.toml with the key postinst
/// made, clients reach both back ends through the VIP, and the installed
/// fepctl sees it all through its default socket.
fn serve_from_the_installed_files() {
    let mut lab = Lab::new("pkg", 2).expect("building the lab");
    lab.start_backend_servers(&lab::workspace_bin("fep-testsrv").unwrap(), &[80], &[])
        .expect("starting back-end servers");
    let mut fep = FepProcess::spawn_file(
        &lab.gateway,
        lab.dir(),
        "fep",
        Path::new("/usr/bin/fep"),
        Path::new(CONFIG),
        &[],
    )
    .unwrap();
    fep.wait_serving().unwrap();
    let agent = lab.backends[0]
        .command("/usr/bin/bep-agent")
        .args(["--config", AGENT_CONFIG])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lab.adopt(Some(0), agent);

    let r = Running { lab, fep };
    let fepctl = |args: &[&str]| output(Command::new("/usr/bin/fepctl").args(args)).unwrap();
    wait_for(&r, "be1's agent to report", Duration::from_secs(15), |_| {
        let nodes: Vec<NodeView> = serde_json::from_str(&fepctl(&["--json", "nodes"])).unwrap();
        nodes
            .iter()
            .any(|n| n.name == "be1" && n.agent_connected && n.report_age_ms.is_some())
    });
    let names = http_names(&r, VIP_V4.into(), 20);
    assert_eq!(
        tally(&names, 2),
        [10, 10],
        "ratio 1:1 of the shipped config: {names:?}"
    );
    let status = fepctl(&["status"]);
    assert!(status.contains("web"), "{status}");
    assert!(
        Path::new(STATE_DIR).join("fep.lock").exists(),
        "fep keeps its state in the packaged state directory"
    );

    let Running { lab, mut fep } = r;
    assert!(fep.stop().unwrap().success(), "{}", fep.log());
    let cleanup =
        output(
            lab.gateway
                .command("/usr/bin/fep")
                .args(["--config", CONFIG, "--cleanup"]),
        )
        .unwrap();
    assert!(cleanup.contains("removed TUN device fep0"), "{cleanup}");
}
