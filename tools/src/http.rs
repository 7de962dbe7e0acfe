//! Just enough HTTP/1.0 for the demo and the tests: one request per
//! connection, `Connection: close`, body read to the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// `GET path` on a new connection to `addr`, body read into memory.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    let mut body = Vec::new();
    let (status, headers) = get_with(addr, path, timeout, |chunk| {
        body.extend_from_slice(chunk);
        Ok(())
    })?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET path`, handing the body to `sink` chunk by chunk (for large bodies).
pub fn get_with(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // One write, one segment: not a request trickled out piece by piece.
    s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("read from {addr}"))?;
        if n == 0 {
            bail!("{addr} closed the connection before the end of the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 16 * 1024 {
            bail!("response head from {addr} is over 16 KiB");
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).to_string();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?} from {addr}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    sink(&head[body_start..])?;
    loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("read body from {addr}"))?;
        if n == 0 {
            break;
        }
        sink(&buf[..n])?;
    }
    Ok((status, headers))
}
