//! Man pages and shell completions written from a binary's clap definition,
//! so that what `man fep` says is what `fep --help` says. Each binary writes
//! its own with the hidden `--generate-docs DIR` (the package's build runs
//! it); nothing here runs at serve time.

use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Writes `DIR/man/NAME.1` (and `NAME-SUB.1` for each subcommand),
/// `DIR/bash/NAME`, `DIR/zsh/_NAME` and `DIR/fish/NAME.fish`, creating the
/// directories; returns the files written.
pub fn write(mut cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut written = Vec::new();
    for entry in std::fs::read_dir(&man)? {
        let path = entry?.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file == format!("{name}.1") || file.starts_with(&format!("{name}-")) {
            written.push(path);
        }
    }
    for (shell, file) in [
        (Shell::Bash, name.clone()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let out = dir.join(shell.to_string());
        std::fs::create_dir_all(&out)?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut text);
        let path = out.join(file);
        std::fs::write(&path, text)?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

/// `--generate-docs DIR` for a binary: writes the files and names them on
/// stdout, or says what failed (exit status 1).
pub fn generate(cmd: Command, dir: &Path) -> std::process::ExitCode {
    let name = cmd.get_name().to_string();
    match write(cmd, dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "{name}: cannot write the man pages and completions to {}: {e}",
                dir.display()
            );
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_page_per_subcommand_and_three_completions() {
        let cmd = Command::new("demo")
            .about("a demo")
            .subcommand(Command::new("nodes").about("list nodes"))
            .arg(
                clap::Arg::new("json")
                    .long("json")
                    .action(clap::ArgAction::SetTrue),
            );
        let dir = std::env::temp_dir().join(format!("fep-cli-docs-{}", std::process::id()));
        let files = write(cmd, &dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "bash/demo",
                "fish/demo.fish",
                "man/demo-nodes.1",
                "man/demo.1",
                "zsh/_demo"
            ]
        );
        let page = std::fs::read_to_string(dir.join("man/demo.1")).unwrap();
        assert!(page.contains("a demo") && page.contains("json"), "{page}");
        let bash = std::fs::read_to_string(dir.join("bash/demo")).unwrap();
        assert!(bash.contains("nodes") && bash.contains("--json"), "{bash}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
