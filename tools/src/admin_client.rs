//! A client for fep's admin API over its Unix socket (or over TCP with a
//! bearer token): typed requests and views from `fep_shared::api`, carried
//! by [`crate::http`].

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use fep_shared::api::{ApiError, Done};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http;

/// How long an answer may take (a command waits until it is in force).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where fep's admin API is.
#[derive(Debug, Clone)]
pub enum AdminAddress {
    /// The Unix socket (`control_socket`).
    Socket(PathBuf),
    /// `admin_listen`, with the token from `admin_token_file`.
    Tcp { addr: String, token: String },
}

impl From<&Path> for AdminAddress {
    fn from(p: &Path) -> Self {
        AdminAddress::Socket(p.to_path_buf())
    }
}

impl From<&PathBuf> for AdminAddress {
    fn from(p: &PathBuf) -> Self {
        AdminAddress::Socket(p.clone())
    }
}

impl From<&AdminAddress> for AdminAddress {
    fn from(e: &AdminAddress) -> Self {
        e.clone()
    }
}

trait Stream: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> Stream for T {}

/// Sends a request; returns the status code and the body.
pub fn request(
    to: &AdminAddress,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (mut s, bearer): (Box<dyn Stream>, _) = match to {
        AdminAddress::Socket(socket) => {
            let s = UnixStream::connect(socket).with_context(|| {
                format!(
                    "cannot reach fep's admin socket {} (is fep running? is this the right --socket?)",
                    socket.display()
                )
            })?;
            s.set_read_timeout(Some(TIMEOUT))?;
            (Box::new(s), None)
        }
        AdminAddress::Tcp { addr, token } => {
            let s = TcpStream::connect(addr).with_context(|| {
                format!("cannot reach fep's admin API at {addr} (is admin_listen set there?)")
            })?;
            s.set_read_timeout(Some(TIMEOUT))?;
            (Box::new(s), Some(format!("Bearer {token}")))
        }
    };
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(bearer.as_deref().map(|b| ("Authorization", b)));
    let req = http::Request {
        method,
        path,
        host: "fep",
        headers: &headers,
        body: body.unwrap_or("").as_bytes(),
    };
    let mut answer = Vec::new();
    let (status, _) = http::exchange(&mut s, &req, |b| {
        answer.extend_from_slice(b);
        Ok(())
    })
    .context("the admin API")?;
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

/// Sends a request and reads the JSON answer as `T`; a non-2xx answer
/// becomes an error carrying the API's message.
fn call<T: DeserializeOwned>(
    to: impl Into<AdminAddress>,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<T> {
    let (status, text) = request(&to.into(), method, path, body.as_deref())?;
    if !(200..300).contains(&status) {
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => bail!("{}", e.error),
            Err(_) => bail!("{}", text.trim()),
        }
    }
    serde_json::from_str(&text)
        .with_context(|| format!("unexpected answer from the admin API to {path}: {text}"))
}

/// `GET path`, its answer read as `T`.
pub fn get<T: DeserializeOwned>(to: impl Into<AdminAddress>, path: &str) -> anyhow::Result<T> {
    call(to, "GET", path, None)
}

/// `POST path` with `body` as JSON: a command, in force once this returns.
pub fn post(
    to: impl Into<AdminAddress>,
    path: &str,
    body: &impl Serialize,
) -> anyhow::Result<Done> {
    post_for(to, path, body)
}

/// As [`post`], for a command that answers with a `T` (a report).
pub fn post_for<T: DeserializeOwned>(
    to: impl Into<AdminAddress>,
    path: &str,
    body: &impl Serialize,
) -> anyhow::Result<T> {
    call(to, "POST", path, Some(serde_json::to_string(body)?))
}
