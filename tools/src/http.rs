//! The HTTP clients of the tools and the tests: HTTP/1.1 over a stream the
//! caller connected (TCP, or the admin API's Unix socket), one request per
//! connection (`Connection: close`), the body handed over as it arrives
//! (close-delimited or chunked); and [`KeepAlive`], one persistent
//! connection for many requests (hyper's client), as browsers and HTTP
//! mode's tests use one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};

/// The longest response head read.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One request: its head's first line and extra headers, and its body.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    /// Headers besides `Host`, `Connection` and `Content-Length`.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
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
    sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let host = addr.to_string();
    let req = Request {
        method: "GET",
        path,
        host: &host,
        headers: &[],
        body: &[],
    };
    exchange(&mut s, &req, sink).with_context(|| format!("GET {path} from {addr}"))
}

/// Sends `req` on `s` and reads the answer to the end: returns the status
/// and headers, and hands the (de-chunked) body to `sink` as it arrives.
pub fn exchange(
    s: &mut (impl Read + Write),
    req: &Request,
    mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(u16, Vec<(String, String)>)> {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        req.method, req.path, req.host
    );
    for (k, v) in req.headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !req.body.is_empty() || req.method != "GET" {
        head += &format!("Content-Length: {}\r\n", req.body.len());
    }
    head += "\r\n";
    let mut out = head.into_bytes();
    out.extend_from_slice(req.body);
    // One write, one segment: not a request trickled out piece by piece. The
    // server may answer (and close) as soon as it has the head; if the rest
    // then meets a closed socket, its answer is still there to read.
    if let Err(e) = s.write_all(&out) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("sending the request");
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = s.read(&mut buf).context("reading the response")?;
        if n == 0 {
            bail!("the connection closed before the end of the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_HEAD {
            bail!("the response head is over {} KiB", MAX_HEAD / 1024);
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).to_string();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut chunked = header(&headers, "transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        .then(Dechunker::default);
    let mut give = |bytes: &[u8]| match &mut chunked {
        Some(d) => d.feed(bytes, &mut sink),
        None => sink(bytes),
    };
    give(&head[body_start..])?;
    loop {
        let n = s.read(&mut buf).context("reading the response body")?;
        if n == 0 {
            break;
        }
        give(&buf[..n])?;
    }
    if chunked.is_some_and(|d| !d.done()) {
        bail!("the chunked body ended early");
    }
    Ok((status, headers))
}

/// One persistent client connection: requests one after another, each
/// response read to its end before the next is sent. Blocking, on a runtime
/// of its own; connect it in the namespace it should come from.
pub struct KeepAlive {
    runtime: tokio::runtime::Runtime,
    sender: hyper::client::conn::http1::SendRequest<ClientBody>,
    host: String,
    timeout: Duration,
}

/// A request body: empty, bytes, or the pattern streamed.
pub type ClientBody = http_body_util::combinators::BoxBody<hyper::body::Bytes, hyper::Error>;

impl KeepAlive {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the client's runtime")?;
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connect to {addr}"))?;
        s.set_nonblocking(true)?;
        let sender = runtime.block_on(async {
            let s = tokio::net::TcpStream::from_std(s)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            anyhow::Ok(sender)
        })?;
        Ok(KeepAlive {
            runtime,
            sender,
            host: addr.to_string(),
            timeout,
        })
    }

    /// `method path` with this connection's `Host` and `headers`.
    fn build(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ClientBody,
    ) -> anyhow::Result<hyper::Request<ClientBody>> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(body).context("building the request")
    }

    /// `GET path`, the body read into memory.
    pub fn get(&mut self, path: &str) -> anyhow::Result<Response> {
        self.request("GET", path, &[], empty())
    }

    /// `method path` with `headers` and `body`, the answer's body handed to
    /// `sink` as it arrives.
    pub fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ClientBody,
        mut sink: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<(u16, Vec<(String, String)>)> {
        use http_body_util::BodyExt;
        let req = self.build(method, path, headers, body)?;
        let (sender, timeout) = (&mut self.sender, self.timeout);
        self.runtime.block_on(async {
            let exchange = async {
                sender.ready().await.context("the connection is closed")?;
                let resp = sender
                    .send_request(req)
                    .await
                    .context("sending the request")?;
                let (status, headers) = head_of(&resp);
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    if let Some(data) = frame.context("reading the response body")?.data_ref() {
                        sink(data)?;
                    }
                }
                anyhow::Ok((status, headers))
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .with_context(|| {
                    format!("{method} {path}: no complete answer within {timeout:?}")
                })?
        })
    }

    /// As [`KeepAlive::request_with`], the body read into memory.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ClientBody,
    ) -> anyhow::Result<Response> {
        let mut out = Vec::new();
        let (status, headers) = self.request_with(method, path, headers, body, |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(Response {
            status,
            headers,
            body: out,
        })
    }

    /// Sends an upgrade request (`GET path`, `headers`) and, on a 101, hands
    /// over the connection for the new protocol.
    pub fn upgrade(
        mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(Response, Upgraded)> {
        let req = self.build("GET", path, headers, empty())?;
        let sender = &mut self.sender;
        let (resp, io) = self.runtime.block_on(async {
            let resp = sender
                .send_request(req)
                .await
                .context("sending the upgrade")?;
            let (status, headers) = head_of(&resp);
            let head = Response {
                status,
                headers,
                body: Vec::new(),
            };
            if status != 101 {
                return anyhow::Ok((head, None));
            }
            let io = hyper::upgrade::on(resp)
                .await
                .context("taking the upgraded connection")?;
            anyhow::Ok((head, Some(io)))
        })?;
        let io = io.with_context(|| format!("the upgrade was refused: {}", resp.status))?;
        Ok((
            resp,
            Upgraded {
                io: hyper_util::rt::TokioIo::new(io),
                runtime: self.runtime,
                timeout: self.timeout,
            },
        ))
    }
}

/// A response's status and headers, as [`Response`] holds them.
fn head_of<B>(resp: &hyper::Response<B>) -> (u16, Vec<(String, String)>) {
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).to_string(),
            )
        })
        .collect();
    (resp.status().as_u16(), headers)
}

/// A connection after a 101: bytes both ways, blocking.
pub struct Upgraded {
    io: hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

impl Upgraded {
    pub fn write_all(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let (io, timeout) = (&mut self.io, self.timeout);
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, io.write_all(bytes))
                .await
                .context("write timed out")??;
            anyhow::Ok(())
        })
    }

    /// Reads what is there (0 at the end).
    pub fn read(&mut self, buf: &mut [u8]) -> anyhow::Result<usize> {
        use tokio::io::AsyncReadExt;
        let (io, timeout) = (&mut self.io, self.timeout);
        self.runtime.block_on(async {
            let n = tokio::time::timeout(timeout, io.read(buf))
                .await
                .context("read timed out")??;
            anyhow::Ok(n)
        })
    }
}

/// An empty request body.
pub fn empty() -> ClientBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// A request body of `bytes`.
pub fn full(bytes: Vec<u8>) -> ClientBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(hyper::body::Bytes::from(bytes))
        .map_err(|e| match e {})
        .boxed()
}

/// Decodes a `Transfer-Encoding: chunked` body piece by piece, however the
/// pieces split it.
#[derive(Default)]
struct Dechunker {
    state: ChunkState,
    /// The part of a size line read so far.
    line: Vec<u8>,
    /// Data bytes left in the current chunk.
    left: usize,
}

#[derive(Default, PartialEq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    Data,
    /// Reading the CRLF after a chunk's data.
    DataEnd,
    /// The last (empty) chunk was read; trailers are ignored.
    Done,
}

impl Dechunker {
    fn feed(
        &mut self,
        mut bytes: &[u8],
        sink: &mut impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        while !bytes.is_empty() {
            match self.state {
                ChunkState::Size | ChunkState::DataEnd => {
                    let Some(i) = bytes.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(bytes);
                        if self.line.len() > 1024 {
                            bail!("bad chunked body: a size line over 1 KiB");
                        }
                        return Ok(());
                    };
                    self.line.extend_from_slice(&bytes[..i]);
                    bytes = &bytes[i + 1..];
                    let line = String::from_utf8_lossy(&self.line).trim().to_string();
                    self.line.clear();
                    if self.state == ChunkState::DataEnd {
                        if !line.is_empty() {
                            bail!("bad chunked body: data longer than its chunk size");
                        }
                        self.state = ChunkState::Size;
                        continue;
                    }
                    let size = line.split(';').next().unwrap_or_default().trim();
                    self.left = usize::from_str_radix(size, 16)
                        .with_context(|| format!("bad chunk size {size:?}"))?;
                    self.state = if self.left == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let n = self.left.min(bytes.len());
                    sink(&bytes[..n])?;
                    self.left -= n;
                    bytes = &bytes[n..];
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                }
                ChunkState::Done => return Ok(()),
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `body` de-chunked when fed in pieces of `step` bytes.
    fn dechunk(body: &[u8], step: usize) -> anyhow::Result<(Vec<u8>, bool)> {
        let (mut d, mut out) = (Dechunker::default(), Vec::new());
        for piece in body.chunks(step) {
            d.feed(piece, &mut |b: &[u8]| {
                out.extend_from_slice(b);
                Ok(())
            })?;
        }
        Ok((out, d.done()))
    }

    #[test]
    fn a_chunked_body_decodes_however_it_is_split() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n,\r\nB\r\n 0123456789\r\n0\r\n\r\n";
        for step in 1..=body.len() {
            let (out, done) = dechunk(body, step).unwrap();
            assert_eq!(out, b"hello, 0123456789", "pieces of {step}");
            assert!(done);
        }
    }

    #[test]
    fn a_cut_or_bad_chunked_body_is_an_error_or_unfinished() {
        assert!(!dechunk(b"5\r\nhel", 3).unwrap().1, "cut short");
        assert!(dechunk(b"zz\r\n", 4).is_err(), "bad size");
        assert!(
            dechunk(b"2\r\nhello\r\n", 20).is_err(),
            "data past its size"
        );
    }

    /// A stream that answers with `answer` and records what was written.
    struct Canned {
        answer: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.answer.read(buf)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_exchange_sends_one_request_and_reads_a_chunked_answer() {
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Node: be1\r\n\r\n2\r\n[]\r\n0\r\n\r\n";
        let mut s = Canned {
            answer: std::io::Cursor::new(answer.to_vec()),
            written: Vec::new(),
        };
        let req = Request {
            method: "POST",
            path: "/v1/drain",
            host: "fep",
            headers: &[("Content-Type", "application/json")],
            body: br#"{"node":"be1"}"#,
        };
        let mut body = Vec::new();
        let (status, headers) = exchange(&mut s, &req, |b| {
            body.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"[]"[..]));
        assert_eq!(header(&headers, "x-node"), Some("be1"));
        assert_eq!(
            String::from_utf8(s.written).unwrap(),
            "POST /v1/drain HTTP/1.1\r\nHost: fep\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"node\":\"be1\"}"
        );
    }
}
