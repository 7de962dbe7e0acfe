//! A client for fep's admin API: HTTP/1.1 over its Unix socket (or over TCP
//! with a bearer token), one request per connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

/// Where fep's admin API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The Unix socket (`control_socket`).
    Socket(PathBuf),
    /// `admin_listen`, with the token from `admin_token_file`.
    Tcp { addr: String, token: String },
}

impl From<&Path> for Endpoint {
    fn from(p: &Path) -> Self {
        Endpoint::Socket(p.to_path_buf())
    }
}

impl From<&PathBuf> for Endpoint {
    fn from(p: &PathBuf) -> Self {
        Endpoint::Socket(p.clone())
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(e: &Endpoint) -> Self {
        e.clone()
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Sends a request; returns the status code and the body.
pub fn request(
    to: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (mut s, auth): (Box<dyn ReadWrite>, String) = match to {
        Endpoint::Socket(socket) => {
            let s = UnixStream::connect(socket).with_context(|| {
                format!(
                    "cannot reach fep's admin socket {} (is fep running? is this the right --socket?)",
                    socket.display()
                )
            })?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            (Box::new(s), String::new())
        }
        Endpoint::Tcp { addr, token } => {
            let s = TcpStream::connect(addr).with_context(|| {
                format!("cannot reach fep's admin API at {addr} (is admin_listen set there?)")
            })?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            (Box::new(s), format!("Authorization: Bearer {token}\r\n"))
        }
    };
    let body = body.unwrap_or("");
    // One write: the server may answer (and close) as soon as it has the
    // head, and a body sent in a second write would then meet a closed
    // socket. If it does anyway, its answer is still there to read.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: fep\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(req.as_bytes()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("sending the request to the admin API");
        }
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .context("reading the admin API's answer")?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        bail!("malformed answer from the admin API");
    };
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed status line from the admin API")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut text: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = text.split_once("\r\n").context("bad chunked body")?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        text = rest.get(n + 2..).context("short chunk")?;
    }
}

/// GET or POST and parse the JSON answer; a non-2xx answer becomes an error
/// carrying the API's message.
pub fn call(
    to: impl Into<Endpoint>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let body = body.map(|b| b.to_string());
    let (status, text) = request(&to.into(), method, path, body.as_deref())?;
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()));
    if !(200..300).contains(&status) {
        let msg = value
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or(text.trim());
        bail!("{msg}");
    }
    Ok(value)
}
