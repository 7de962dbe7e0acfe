//! The WebSocket pieces the test server and the tests need (RFC 6455): the
//! handshake's accept key and frames, encoded and decoded over byte buffers.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client's key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The largest frame payload decoded (larger ones are a protocol error here).
pub const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let digest = Sha1::new()
        .chain_update(key.as_bytes())
        .chain_update(GUID)
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// One final frame: `opcode`, `payload`, masked with `mask` (a client must
/// mask; a server must not).
pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(masked | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(masked | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(masked | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// Decodes the frame at the start of `buf`: the frame and the bytes it
/// took, `Ok(None)` when `buf` holds only part of it.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let (len, mut at) = match b1 & 0x7f {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(|| format!("frame of {len} bytes is over {MAX_PAYLOAD}"))?;
    let mask = if b1 & 0x80 != 0 {
        let Some(m) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        at += 4;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    let Some(data) = buf.get(at..at + len) else {
        return Ok(None);
    };
    let payload = match mask {
        Some(m) => data.iter().enumerate().map(|(i, b)| b ^ m[i % 4]).collect(),
        None => data.to_vec(),
    };
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload,
    };
    Ok(Some((frame, at + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn frames_round_trip_at_every_length_form() {
        for len in [0, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let wire = encode(BINARY, &payload, mask);
                for cut in [0, 1, wire.len() / 2, wire.len() - 1] {
                    assert_eq!(decode(&wire[..cut]).unwrap(), None, "{len} cut at {cut}");
                }
                let (frame, used) = decode(&wire).unwrap().unwrap();
                assert_eq!(used, wire.len());
                assert!(frame.fin);
                assert_eq!(frame.opcode, BINARY);
                assert_eq!(frame.payload, payload);
            }
        }
    }

    #[test]
    fn an_oversized_frame_is_an_error() {
        let mut wire = vec![0x82, 127];
        wire.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert!(decode(&wire).is_err());
    }
}
