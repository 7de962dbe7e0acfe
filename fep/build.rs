//! Compiles the kernel fast path (`bpf/fast_path.bpf.c`) with clang for the
//! BPF target. Where clang or libbpf's headers are missing, fep is built
//! without it (`fast_path = "tc-bpf"` then says why at start) and a warning
//! names the packages; nothing is installed here.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "bpf/fast_path.bpf.c";

fn main() {
    println!("cargo::rerun-if-changed={SOURCE}");
    println!("cargo::rerun-if-env-changed=FEP_CLANG");
    // Built again once the tools arrive (a path that does not exist counts
    // as changed on every build, so a build without them checks again).
    println!("cargo::rerun-if-changed=/usr/bin/clang");
    println!("cargo::rerun-if-changed=/usr/include/bpf/bpf_helpers.h");
    println!("cargo::rustc-check-cfg=cfg(fep_fast_path)");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("fast_path.bpf.o");
    let clang = std::env::var("FEP_CLANG").unwrap_or_else(|_| "clang".into());
    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"]);
    if let Some(dir) = multiarch_include() {
        cmd.arg(format!("-I{dir}"));
    }
    cmd.args(["-c", SOURCE, "-o"]).arg(&object);
    let why = match cmd.output() {
        Ok(o) if o.status.success() => {
            println!("cargo::rustc-cfg=fep_fast_path");
            return;
        }
        Ok(o) => format!(
            "{clang} could not compile {SOURCE}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run {clang} ({e})"),
    };
    for line in why.lines().take(8) {
        println!("cargo::warning={line}");
    }
    println!(
        "cargo::warning=fep is built WITHOUT the kernel fast path (fast_path = \"tc-bpf\"): \
         run tools/install-build-deps (apt-get install clang libbpf-dev) and rebuild"
    );
}

/// The directory with `asm/types.h` for the build machine (Debian keeps it
/// under the multiarch triple), which the BPF target does not search.
fn multiarch_include() -> Option<String> {
    let out = Command::new("gcc").arg("-print-multiarch").output().ok()?;
    let triple = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let dir = format!("/usr/include/{triple}");
    (!triple.is_empty() && std::path::Path::new(&dir).is_dir()).then_some(dir)
}
