//! The agent protocol: what `bep-agent` and `fep` say to each other over the
//! TCP connection the agent opens.
//!
//! Framing: each side first sends a hello frame, `b"FEPA"`, a version (u16)
//! and a fresh 16-byte random nonce. After that every frame is
//! `len (u32, big endian) | HMAC-SHA256 (32 bytes) | JSON body`, where the
//! body is an [`Envelope`] with the sender's sequence number and the MAC is
//! computed under the key (the master key, or the registering node's key
//! derived from it, see [`Key::derive`]) over a direction label (agent → FEP or
//! FEP → agent), the *receiver's* nonce and the body. So a frame forged
//! without the key fails the MAC, a frame replayed within a connection fails
//! the sequence check, one replayed from another connection fails the MAC
//! (another nonce), and one side's frame never verifies as the other's
//! (another label). Frames over [`MAX_FRAME`] bytes, and a first frame (the
//! registration) over [`MAX_REGISTER_FRAME`], are refused before they are
//! read. Lists of connections are split into frames of at most
//! [`MAX_CONNS_PER_FRAME`], so any number of them fits under the limit.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;

/// Protocol version carried in the hello frame and every envelope.
pub const VERSION: u16 = 3;
/// Largest frame (MAC and body) accepted.
pub const MAX_FRAME: usize = 4 << 20;
/// Largest first frame accepted from an agent: a registration is tiny, so an
/// unauthenticated peer cannot make the FEP read megabytes.
pub const MAX_REGISTER_FRAME: usize = 4 << 10;
/// Connections per query, answer or live-list frame: 16,384 of the longest
/// (IPv6) form stay well under [`MAX_FRAME`] (checked by a unit test).
pub const MAX_CONNS_PER_FRAME: usize = 16_384;
/// Size of the hello frame: magic, version, nonce.
pub const HELLO_LEN: usize = 4 + 2 + 16;
const MAGIC: &[u8; 4] = b"FEPA";
const MAC_LEN: usize = 32;

/// The shared secret (32 bytes, written as 64 hex characters in a key file).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn from_hex(text: &str) -> Result<Key, String> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(format!("expected 64 hex characters, found {}", text.len()));
        }
        let mut k = [0u8; 32];
        hex::decode_to_slice(text, &mut k).map_err(|e| format!("not hex: {e}"))?;
        Ok(Key(k))
    }

    /// Reads a key file.
    pub fn load(path: &std::path::Path) -> Result<Key, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read key file '{}': {e}", path.display()))?;
        Key::from_hex(&text).map_err(|e| format!("key file '{}': {e}", path.display()))
    }

    /// A new random key, as hex for a key file.
    pub fn generate_hex() -> String {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the OS random source works");
        hex::encode(k)
    }

    /// The key of one node, derived from a master key: an agent given only
    /// its node's key can speak for no other node.
    pub fn derive(&self, node: &str) -> Key {
        let mut m = self.hmac();
        m.update(b"fep-agent node key\0");
        m.update(node.as_bytes());
        Key(m.finalize().into_bytes().into())
    }

    /// As hex, for a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn hmac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    fn mac(&self, direction: &[u8], nonce: &[u8; 16], body: &[u8]) -> Hmac<Sha256> {
        let mut m = self.hmac();
        m.update(direction);
        m.update(nonce);
        m.update(body);
        m
    }
}

/// A message of one direction; its label goes into the MAC.
pub trait Message {
    const DIRECTION: &'static [u8];
}

impl Message for AgentMsg {
    const DIRECTION: &'static [u8] = b"agent->fep\0";
}

impl Message for FepMsg {
    const DIRECTION: &'static [u8] = b"fep->agent\0";
}

/// A client connection the FEP asks about: as the back end sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId {
    pub client: IpAddr,
    pub client_port: u16,
    /// The back end's (local) port.
    pub port: u16,
}

/// Load of one watched service port on a back end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceLoad {
    pub port: u16,
    /// Something listens on the port (TCP listen socket or bound UDP socket).
    pub listening: bool,
    /// Live TCP connections (0 for UDP).
    pub connections: u32,
    /// Packets received per second: the `load` scheduler's default metric.
    pub rx_pps: f64,
}

/// A periodic (or, on an up/down change, immediate) load report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// CPU busy, 0–100 %, since the last report.
    pub cpu_percent: f64,
    /// 1, 5 and 15 minute load averages.
    pub load_avg: [f64; 3],
    pub services: Vec<ServiceLoad>,
}

/// Agent → FEP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message: which node this agent speaks for.
    Register {
        node: String,
    },
    Report(Report),
    /// Answer to [`FepMsg::Query`]: the asked connections that are live.
    Live {
        id: u64,
        live: Vec<ConnId>,
    },
    /// Answer to [`FepMsg::ListLive`]: live TCP connections on its `ports`
    /// (`udp` false) and kept UDP routes on its `udp_ports` (`udp` true), in
    /// parts of at most [`MAX_CONNS_PER_FRAME`]; `done` marks the last.
    LiveList {
        conns: Vec<ConnId>,
        udp: bool,
        done: bool,
    },
    /// Result of [`FepMsg::Start`] / [`FepMsg::Stop`].
    Control {
        port: u16,
        start: bool,
        ok: bool,
        message: String,
    },
}

/// FEP → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FepMsg {
    /// Which of these connections (at most [`MAX_CONNS_PER_FRAME`]) still
    /// have a live connection here?
    Query { id: u64, conns: Vec<ConnId> },
    /// Which connections are live on these TCP ports, and which UDP routes
    /// are kept on these UDP ports? (A front end that restarted, or took
    /// over the node's VIP group, rebuilds its routes from the answers.)
    ListLive {
        ports: Vec<u16>,
        udp_ports: Vec<u16>,
    },
    /// Keep these confirmed UDP routes to this node (at most
    /// [`MAX_CONNS_PER_FRAME`]): a UDP flow leaves no connection table to
    /// rebuild its route from, so the back end it points at keeps a copy
    /// for whichever front end holds the flow's VIP next.
    KeepRoutes { conns: Vec<ConnId> },
    /// These kept routes have ended.
    ForgetRoutes { conns: Vec<ConnId> },
    /// Run the start command of the service on `port`.
    Start { port: u16 },
    /// Run the stop command of the service on `port`.
    Stop { port: u16 },
}

/// What goes inside every authenticated frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u16,
    pub seq: u64,
    pub msg: T,
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    #[error("frame authentication failed (wrong key, or a forged or replayed frame)")]
    BadMac,
    #[error("replayed or reordered frame: sequence {got}, expected above {last}")]
    Replay { got: u64, last: u64 },
    #[error("garbled frame: {0}")]
    Garbled(String),
    #[error("peer speaks protocol version {0}, this side {VERSION}")]
    Version(u16),
    #[error("unsolicited message: {0}")]
    Unsolicited(String),
}

impl ProtocolError {
    /// Every counter label [`ProtocolError::kind`] gives.
    pub const KINDS: [&'static str; 6] = [
        "oversized",
        "bad_mac",
        "replay",
        "garbled",
        "version",
        "unsolicited",
    ];

    /// The counter label for this rejection.
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::Oversized(_) => "oversized",
            ProtocolError::BadMac => "bad_mac",
            ProtocolError::Replay { .. } => "replay",
            ProtocolError::Garbled(_) => "garbled",
            ProtocolError::Version(_) => "version",
            ProtocolError::Unsolicited(_) => "unsolicited",
        }
    }
}

/// A hello frame with a fresh random nonce; keep the nonce for [`Session::new`].
pub fn hello() -> ([u8; HELLO_LEN], [u8; 16]) {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    let mut frame = [0u8; HELLO_LEN];
    frame[..4].copy_from_slice(MAGIC);
    frame[4..6].copy_from_slice(&VERSION.to_be_bytes());
    frame[6..].copy_from_slice(&nonce);
    (frame, nonce)
}

/// The peer's nonce from its hello frame.
pub fn parse_hello(frame: &[u8; HELLO_LEN]) -> Result<[u8; 16], ProtocolError> {
    if &frame[..4] != MAGIC {
        return Err(ProtocolError::Garbled(
            "not an fep agent-protocol hello".into(),
        ));
    }
    let v = u16::from_be_bytes([frame[4], frame[5]]);
    if v != VERSION {
        return Err(ProtocolError::Version(v));
    }
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&frame[6..]);
    Ok(nonce)
}

/// One side of an authenticated connection, after the hello exchange.
#[derive(Debug)]
pub struct Session {
    key: Key,
    own_nonce: [u8; 16],
    peer_nonce: [u8; 16],
    sent: u64,
    received: u64,
}

impl Session {
    pub fn new(key: Key, own_nonce: [u8; 16], peer_nonce: [u8; 16]) -> Self {
        Session {
            key,
            own_nonce,
            peer_nonce,
            sent: 0,
            received: 0,
        }
    }

    /// A complete frame (length prefix included) carrying `msg`.
    pub fn seal<T: Message + Serialize>(&mut self, msg: &T) -> Vec<u8> {
        self.sent += 1;
        let body = serde_json::to_vec(&Envelope {
            version: VERSION,
            seq: self.sent,
            msg,
        })
        .expect("protocol messages serialise");
        let mac = self
            .key
            .mac(T::DIRECTION, &self.peer_nonce, &body)
            .finalize()
            .into_bytes();
        let mut frame = Vec::with_capacity(4 + MAC_LEN + body.len());
        frame.extend_from_slice(&((MAC_LEN + body.len()) as u32).to_be_bytes());
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&body);
        frame
    }

    /// Checks a frame's announced length before reading it.
    pub fn check_len(len: u32) -> Result<usize, ProtocolError> {
        Self::check_len_within(len, MAX_FRAME)
    }

    /// As [`Session::check_len`], with another limit (`max` ≤ [`MAX_FRAME`]).
    pub fn check_len_within(len: u32, max: usize) -> Result<usize, ProtocolError> {
        let len = len as usize;
        if len > max.min(MAX_FRAME) {
            return Err(ProtocolError::Oversized(len));
        }
        if len < MAC_LEN {
            return Err(ProtocolError::Garbled(format!(
                "frame of {len} bytes is shorter than its MAC"
            )));
        }
        Ok(len)
    }

    /// Authenticates and decodes a frame (without its length prefix).
    pub fn open<T: Message + DeserializeOwned>(
        &mut self,
        frame: &[u8],
    ) -> Result<T, ProtocolError> {
        Self::check_len(frame.len() as u32)?;
        let (mac, body) = frame.split_at(MAC_LEN);
        self.key
            .mac(T::DIRECTION, &self.own_nonce, body)
            .verify_slice(mac)
            .map_err(|_| ProtocolError::BadMac)?;
        let env: Envelope<T> =
            serde_json::from_slice(body).map_err(|e| ProtocolError::Garbled(e.to_string()))?;
        if env.version != VERSION {
            return Err(ProtocolError::Version(env.version));
        }
        if env.seq <= self.received {
            return Err(ProtocolError::Replay {
                got: env.seq,
                last: self.received,
            });
        }
        self.received = env.seq;
        Ok(env.msg)
    }

    /// The node an agent's first frame registers, read *before* its MAC is
    /// checked, so that the FEP can pick that node's key (see
    /// [`Key::derive`]); nothing may act on it until [`Session::open`] (after
    /// [`Session::set_key`]) has verified the frame.
    pub fn claimed_node(frame: &[u8]) -> Option<String> {
        let body = frame.get(MAC_LEN..)?;
        match serde_json::from_slice::<Envelope<AgentMsg>>(body).ok()?.msg {
            AgentMsg::Register { node } => Some(node),
            _ => None,
        }
    }

    /// Verifies and seals with `key` from now on.
    pub fn set_key(&mut self, key: Key) {
        self.key = key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_hex(&hex::encode([b; 32])).unwrap()
    }

    /// An agent and an FEP session that exchanged hellos.
    fn pair() -> (Session, Session) {
        let (_, agent_nonce) = hello();
        let (_, fep_nonce) = hello();
        (
            Session::new(key(7), agent_nonce, fep_nonce),
            Session::new(key(7), fep_nonce, agent_nonce),
        )
    }

    fn body(frame: &[u8]) -> &[u8] {
        &frame[4..]
    }

    #[test]
    fn messages_round_trip_both_ways() {
        let (mut agent, mut fep) = pair();
        let msg = AgentMsg::Register { node: "be1".into() };
        assert_eq!(fep.open::<AgentMsg>(body(&agent.seal(&msg))).unwrap(), msg);
        let q = FepMsg::Query {
            id: 3,
            conns: vec![ConnId {
                client: "10.0.1.2".parse().unwrap(),
                client_port: 40000,
                port: 80,
            }],
        };
        assert_eq!(agent.open::<FepMsg>(body(&fep.seal(&q))).unwrap(), q);
    }

    #[test]
    fn replayed_frames_are_rejected() {
        let (mut agent, mut fep) = pair();
        let f1 = agent.seal(&AgentMsg::Register { node: "be1".into() });
        fep.open::<AgentMsg>(body(&f1)).unwrap();
        assert!(matches!(
            fep.open::<AgentMsg>(body(&f1)),
            Err(ProtocolError::Replay { got: 1, last: 1 })
        ));
        // Replayed into another connection: other nonce, MAC fails.
        let (_, mut fep2) = pair();
        assert_eq!(
            fep2.open::<AgentMsg>(body(&f1)).unwrap_err(),
            ProtocolError::BadMac
        );
    }

    #[test]
    fn forged_and_tampered_frames_are_rejected() {
        let (mut agent, mut fep) = pair();
        let mut f = agent.seal(&AgentMsg::Register { node: "be1".into() });
        let last = f.len() - 3;
        f[last] ^= 1;
        assert_eq!(
            fep.open::<AgentMsg>(body(&f)).unwrap_err(),
            ProtocolError::BadMac
        );
        // Sealed under another key.
        let (mut other, _) = pair();
        other.key = key(8);
        let f = other.seal(&AgentMsg::Register { node: "be1".into() });
        assert_eq!(
            fep.open::<AgentMsg>(body(&f)).unwrap_err(),
            ProtocolError::BadMac
        );
    }

    #[test]
    fn oversized_short_and_garbled_frames_are_rejected() {
        assert!(matches!(
            Session::check_len(u32::MAX),
            Err(ProtocolError::Oversized(_))
        ));
        assert!(matches!(
            Session::check_len(5),
            Err(ProtocolError::Garbled(_))
        ));
        let (mut agent, mut fep) = pair();
        // A correctly authenticated body that is not a message.
        let body = b"{\"version\":1,\"seq\":1,\"msg\":{\"type\":\"explode\"}}";
        let mac = agent
            .key
            .mac(AgentMsg::DIRECTION, &agent.peer_nonce, body)
            .finalize()
            .into_bytes();
        let mut frame = mac.to_vec();
        frame.extend_from_slice(body);
        assert!(matches!(
            fep.open::<AgentMsg>(&frame),
            Err(ProtocolError::Garbled(_))
        ));
        let _ = agent.seal(&AgentMsg::Register { node: "x".into() });
        // Random bytes.
        assert_eq!(
            fep.open::<AgentMsg>(&[0xab; 100]).unwrap_err(),
            ProtocolError::BadMac
        );
    }

    #[test]
    fn a_frame_of_one_direction_never_verifies_as_the_other() {
        let (mut agent, mut fep) = pair();
        // The same nonces both ways, so that only the label differs.
        let mut agent_as_fep = Session::new(key(7), fep.own_nonce, agent.own_nonce);
        let f = agent.seal(&AgentMsg::Register { node: "be1".into() });
        assert_eq!(
            agent_as_fep.open::<FepMsg>(body(&f)).unwrap_err(),
            ProtocolError::BadMac
        );
        assert!(fep.open::<AgentMsg>(body(&f)).is_ok());
    }

    #[test]
    fn a_full_frame_of_the_longest_connections_fits_under_the_limit() {
        let conn = ConnId {
            client: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
            client_port: 65535,
            port: 65535,
        };
        let (mut agent, mut fep) = pair();
        let msg = AgentMsg::LiveList {
            conns: vec![conn; MAX_CONNS_PER_FRAME],
            udp: true,
            done: false,
        };
        let f = agent.seal(&msg);
        assert!(f.len() - 4 < MAX_FRAME / 2, "{} bytes", f.len());
        assert_eq!(fep.open::<AgentMsg>(body(&f)).unwrap(), msg);
        let q = FepMsg::Query {
            id: u64::MAX,
            conns: vec![conn; MAX_CONNS_PER_FRAME],
        };
        assert!(fep.seal(&q).len() - 4 < MAX_FRAME / 2);
    }

    #[test]
    fn a_registration_over_the_first_frame_limit_is_refused_before_reading() {
        assert!(Session::check_len_within(4096, MAX_REGISTER_FRAME).is_ok());
        assert_eq!(
            Session::check_len_within(4097, MAX_REGISTER_FRAME).unwrap_err(),
            ProtocolError::Oversized(4097)
        );
    }

    #[test]
    fn a_node_key_speaks_only_for_its_node() {
        let master = key(7);
        assert_eq!(master.derive("be1").0, master.derive("be1").0);
        assert_ne!(master.derive("be1").0, master.derive("be2").0);
        assert_ne!(master.derive("be1").0, master.0);
        // An agent holding be1's key registers as be2: the FEP checks the
        // frame under be2's key, and it fails.
        let (mut agent, mut fep) = pair();
        agent.set_key(master.derive("be1"));
        let f = agent.seal(&AgentMsg::Register { node: "be2".into() });
        let claimed = Session::claimed_node(body(&f)).unwrap();
        assert_eq!(claimed, "be2");
        fep.set_key(master.derive(&claimed));
        assert_eq!(
            fep.open::<AgentMsg>(body(&f)).unwrap_err(),
            ProtocolError::BadMac
        );
        let f = agent.seal(&AgentMsg::Register { node: "be1".into() });
        fep.set_key(master.derive(&Session::claimed_node(body(&f)).unwrap()));
        assert!(fep.open::<AgentMsg>(body(&f)).is_ok());
        assert_eq!(Session::claimed_node(&[1; 10]), None);
    }

    #[test]
    fn hello_checks_magic_and_version() {
        let (mut f, nonce) = hello();
        assert_eq!(parse_hello(&f).unwrap(), nonce);
        f[5] = 9;
        assert_eq!(parse_hello(&f).unwrap_err(), ProtocolError::Version(9));
        f[0] = b'X';
        assert!(matches!(parse_hello(&f), Err(ProtocolError::Garbled(_))));
    }

    #[test]
    fn a_key_reads_back_from_its_hex_and_never_shows_in_debug_output() {
        let k = key(0xa5);
        assert_eq!(k.to_hex(), "a5".repeat(32));
        let node = k.derive("be1");
        assert_eq!(Key::from_hex(&node.to_hex()).unwrap().0, node.0);
        assert_eq!(format!("{k:?}"), "Key(..)");
    }

    #[test]
    fn a_frame_announces_its_own_length_and_the_shortest_is_a_bare_mac() {
        let (mut agent, _) = pair();
        let f = agent.seal(&AgentMsg::Register { node: "be1".into() });
        let len = u32::from_be_bytes(f[..4].try_into().unwrap());
        assert_eq!(len as usize, f.len() - 4);
        assert_eq!(Session::check_len(len), Ok(len as usize));
        assert_eq!(Session::check_len(32), Ok(32));
        assert!(matches!(
            Session::check_len(31),
            Err(ProtocolError::Garbled(_))
        ));
    }

    #[test]
    fn every_rejection_has_its_own_counter_label() {
        let errors = [
            ProtocolError::Oversized(1),
            ProtocolError::BadMac,
            ProtocolError::Replay { got: 1, last: 1 },
            ProtocolError::Garbled(String::new()),
            ProtocolError::Version(1),
            ProtocolError::Unsolicited(String::new()),
        ];
        assert_eq!(errors.map(|e| e.kind()), ProtocolError::KINDS);
    }

    #[test]
    fn keys_must_be_64_hex_characters() {
        assert!(Key::from_hex(&Key::generate_hex()).is_ok());
        assert!(Key::from_hex("abcd").unwrap_err().contains("64 hex"));
        assert!(Key::from_hex(&"zz".repeat(32))
            .unwrap_err()
            .contains("not hex"));
    }
}

/// Async framing over a TCP stream, shared by both ends.
#[cfg(feature = "tokio")]
pub mod io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::OwnedReadHalf;
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;

    use super::{hello, parse_hello, Key, ProtocolError, Session, HELLO_LEN, MAX_FRAME};

    /// Why a connection could not be set up.
    #[derive(Debug, thiserror::Error)]
    pub enum HandshakeError {
        #[error("connection: {0}")]
        Io(#[from] std::io::Error),
        #[error("no hello from the peer within the time limit")]
        Timeout,
        #[error(transparent)]
        Protocol(#[from] ProtocolError),
    }

    /// Exchanges hello frames and returns the session for this connection.
    pub async fn handshake(
        stream: &mut TcpStream,
        key: Key,
        wait: std::time::Duration,
    ) -> Result<Session, HandshakeError> {
        let _ = stream.set_nodelay(true);
        let (frame, nonce) = hello();
        stream.write_all(&frame).await?;
        let mut peer = [0u8; HELLO_LEN];
        tokio::time::timeout(wait, stream.read_exact(&mut peer))
            .await
            .map_err(|_| HandshakeError::Timeout)??;
        Ok(Session::new(key, nonce, parse_hello(&peer)?))
    }

    /// Reads one length-prefixed frame of at most `max` bytes; `Ok(None)`
    /// when the stream ends or fails first.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        rd: &mut R,
        max: usize,
    ) -> Result<Option<Vec<u8>>, ProtocolError> {
        let Ok(len) = rd.read_u32().await else {
            return Ok(None);
        };
        let mut buf = vec![0u8; Session::check_len_within(len, max)?];
        Ok(rd.read_exact(&mut buf).await.ok().map(|_| buf))
    }

    /// Reads length-prefixed frames into `tx` until the stream ends or a
    /// frame is refused (sent as an error, then the reader stops), so that a
    /// session loop can wait for frames and its own messages at once.
    pub async fn read_frames(
        mut rd: OwnedReadHalf,
        tx: mpsc::Sender<Result<Vec<u8>, ProtocolError>>,
    ) {
        loop {
            let frame = match read_frame(&mut rd, MAX_FRAME).await {
                Ok(Some(f)) => Ok(f),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let refused = frame.is_err();
            if tx.send(frame).await.is_err() || refused {
                return;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        use tokio::net::{TcpListener, TcpStream};

        use super::super::{AgentMsg, Key, MAX_REGISTER_FRAME};
        use super::*;

        fn framed(body: &[u8]) -> Vec<u8> {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            f
        }

        /// Both ends of a loopback TCP connection.
        async fn connected() -> (TcpStream, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
            (client.unwrap(), server.unwrap().0)
        }

        #[tokio::test]
        async fn a_frame_is_read_whole_and_a_short_or_oversized_one_is_not() {
            let body = [7u8; 40];
            let mut rd = &framed(&body)[..];
            assert_eq!(read_frame(&mut rd, 40).await, Ok(Some(body.to_vec())));
            assert_eq!(read_frame(&mut rd, 40).await, Ok(None), "end of stream");
            let cut = framed(&body);
            assert_eq!(read_frame(&mut &cut[..30], 40).await, Ok(None));
            assert_eq!(
                read_frame(&mut &framed(&body)[..], 39).await,
                Err(ProtocolError::Oversized(40))
            );
        }

        #[tokio::test]
        async fn the_reader_passes_frames_on_and_stops_at_the_first_refused_one() {
            let (mut writer, reader) = connected().await;
            let mut bytes = framed(&[1; 40]);
            bytes.extend(framed(&[2; 50]));
            bytes.extend(u32::MAX.to_be_bytes());
            bytes.extend(framed(&[3; 40]));
            writer.write_all(&bytes).await.unwrap();
            drop(writer);
            let (tx, mut rx) = mpsc::channel(8);
            let (rd, _wr) = reader.into_split();
            tokio::time::timeout(Duration::from_secs(10), read_frames(rd, tx))
                .await
                .expect("the reader stops at the refused frame");
            let mut got = Vec::new();
            while let Some(f) = rx.recv().await {
                got.push(f);
            }
            assert_eq!(
                got,
                vec![
                    Ok(vec![1; 40]),
                    Ok(vec![2; 50]),
                    Err(ProtocolError::Oversized(u32::MAX as usize))
                ]
            );
        }

        #[tokio::test]
        async fn a_handshake_gives_both_ends_one_session_and_times_out_on_silence() {
            let key = Key([9; 32]);
            let (mut a, mut b) = connected().await;
            let wait = Duration::from_secs(10);
            let (sa, sb) = tokio::join!(
                handshake(&mut a, key.clone(), wait),
                handshake(&mut b, key.clone(), wait)
            );
            let (mut agent, mut fep) = (sa.unwrap(), sb.unwrap());
            let msg = AgentMsg::Register { node: "be1".into() };
            let frame = agent.seal(&msg);
            assert!(frame.len() - 4 <= MAX_REGISTER_FRAME);
            assert_eq!(fep.open::<AgentMsg>(&frame[4..]), Ok(msg));

            // A peer that connects and says nothing.
            let (mut silent, _peer) = connected().await;
            let r = handshake(&mut silent, key.clone(), Duration::from_millis(50)).await;
            assert!(matches!(r, Err(HandshakeError::Timeout)), "{r:?}");
            // A peer whose hello is not one.
            let (mut c, mut d) = connected().await;
            d.write_all(&[0u8; HELLO_LEN]).await.unwrap();
            let r = handshake(&mut c, key, wait).await;
            assert!(
                matches!(r, Err(HandshakeError::Protocol(ProtocolError::Garbled(_)))),
                "{r:?}"
            );
        }
    }
}
