//! `bep-agent`: the back-end agent. Its reports, connection-state monitor and
//! protocol come with the control-loop issue; until then it says so.

fn main() -> std::process::ExitCode {
    eprintln!("bep-agent: not available yet in this version (the control-loop issue adds it); fep runs without agents");
    std::process::ExitCode::from(2)
}
