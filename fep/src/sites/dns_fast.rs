//! The common query answered from bytes: a header, one question for a
//! name of the zone, perhaps a plain OPT record — parsed in place, the
//! reply written into a reused buffer, nothing allocated. Anything else
//! (client subnet, an unusual header, the apex, the name servers' names,
//! a reply that would not fit) is left to the general path in
//! [`super::dns`], which gives the same answers through hickory-proto.

use std::collections::HashMap;
use std::net::IpAddr;

use super::dns::{Class, Lookup, EDNS_PAYLOAD};

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// An EDNS option code the general path must see (client subnet).
const OPTION_SUBNET: u16 = 8;
const MAX_NAME: usize = 255;

/// The zone's names in the form a query is matched in: wire format,
/// lower case.
#[derive(Debug, Clone, Default)]
pub struct FastZone {
    /// The configured names and their TTLs.
    names: HashMap<Box<[u8]>, (usize, u32), ahash::RandomState>,
    apex: Box<[u8]>,
    /// Names the general path answers (the apex, name servers, names with
    /// names below them): never NXDOMAIN here.
    special: std::collections::HashSet<Box<[u8]>, ahash::RandomState>,
    /// The SOA record for negative answers, owner the apex, uncompressed.
    soa: Box<[u8]>,
}

/// The one question of a query, and what the reply needs of the rest.
struct Question<'q> {
    /// The question section as sent (name in its own case, type, class).
    raw: &'q [u8],
    qtype: u16,
    /// The reply's size limit over UDP.
    limit: usize,
    edns: bool,
}

impl FastZone {
    /// From the names' wire forms (`(lower-case wire name, TTL)` by index),
    /// the apex's, the general path's names and the SOA record.
    pub fn new(
        names: impl IntoIterator<Item = (Vec<u8>, u32)>,
        apex: Vec<u8>,
        special: impl IntoIterator<Item = Vec<u8>>,
        soa: Vec<u8>,
    ) -> FastZone {
        FastZone {
            names: names
                .into_iter()
                .enumerate()
                .map(|(i, (n, ttl))| (n.into_boxed_slice(), (i, ttl)))
                .collect(),
            apex: apex.into_boxed_slice(),
            special: special.into_iter().map(Vec::into_boxed_slice).collect(),
            soa: soa.into_boxed_slice(),
        }
    }

    /// The reply to a UDP `query` from `client` written into `out`, or
    /// `None` (with `out` in any state) for the general path.
    pub fn answer(
        &self,
        query: &[u8],
        client: IpAddr,
        lookup: &impl Lookup,
        addrs: &mut Vec<IpAddr>,
        out: &mut Vec<u8>,
    ) -> Option<Class> {
        let mut lower = [0u8; MAX_NAME];
        let (q, name) = parse(query, &mut lower)?;
        if !ends_with_label(name, &self.apex) || self.special.contains(name) {
            return None;
        }
        out.clear();
        // ID, then QR | AA with the query's RD; RA, Z, AD, CD and RCODE 0.
        out.extend_from_slice(&query[..2]);
        out.push(0x84 | (query[2] & 0x01));
        out.push(0);
        out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(q.edns)]);
        out.extend_from_slice(q.raw);
        let class = match self.names.get(name) {
            Some(&(i, ttl)) if q.qtype == TYPE_A || q.qtype == TYPE_AAAA => {
                addrs.clear();
                lookup.addresses(i, q.qtype == TYPE_AAAA, client, addrs);
                for a in addrs.iter() {
                    answer_record(out, q.qtype, ttl, a);
                }
                let n = addrs.len() as u16;
                out[6..8].copy_from_slice(&n.to_be_bytes());
                if n == 0 {
                    self.negative(out);
                    Class::NoData
                } else {
                    Class::NoError
                }
            }
            Some(_) => {
                self.negative(out);
                Class::NoData
            }
            None => {
                out[3] = 3; // NXDOMAIN
                self.negative(out);
                Class::NxDomain
            }
        };
        if q.edns {
            // OPT: root owner, our payload size, version 0, no options.
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        (out.len() <= q.limit).then_some(class)
    }

    /// The SOA in the authority section (NXDOMAIN and NODATA).
    fn negative(&self, out: &mut Vec<u8>) {
        out[9] = 1;
        out.extend_from_slice(&self.soa);
    }
}

/// An A or AAAA record whose owner is the question's name (a pointer to
/// offset 12).
fn answer_record(out: &mut Vec<u8>, qtype: u16, ttl: u32, addr: &IpAddr) {
    out.extend_from_slice(&[0xc0, 12]);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    match addr {
        IpAddr::V4(a) => {
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.extend_from_slice(&16u16.to_be_bytes());
            out.extend_from_slice(&a.octets());
        }
    }
}

/// The query's question and its name in lower case (in `lower`), when the
/// query is the plain kind: a standard query with one question of class
/// IN, no answer or authority records, at most one OPT record of version 0
/// without a client subnet, and nothing after it.
fn parse<'q, 'l>(
    query: &'q [u8],
    lower: &'l mut [u8; MAX_NAME],
) -> Option<(Question<'q>, &'l [u8])> {
    let word = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]))
    };
    let (flags, qd, an, ns, ar) = (word(2)?, word(4)?, word(6)?, word(8)?, word(10)?);
    // QR 0, OPCODE 0, TC 0; one question, no answers or authority.
    if flags & 0xfa00 != 0 || qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let mut at = 12;
    let mut len = 0;
    loop {
        let label = usize::from(*query.get(at)?);
        if label & 0xc0 != 0 || len + label + 1 > MAX_NAME {
            return None;
        }
        let bytes = query.get(at..at + 1 + label)?;
        for (d, s) in lower[len..len + 1 + label].iter_mut().zip(bytes) {
            *d = s.to_ascii_lowercase();
        }
        len += 1 + label;
        at += 1 + label;
        if label == 0 {
            break;
        }
    }
    let (qtype, qclass) = (word(at)?, word(at + 2)?);
    if qclass != CLASS_IN {
        return None;
    }
    let raw = &query[12..at + 4];
    at += 4;
    let (mut limit, mut edns) = (512, false);
    if ar == 1 {
        // Root owner, OPT, payload size, extended RCODE 0 and version 0.
        if query.get(at) != Some(&0) || word(at + 1)? != TYPE_OPT || word(at + 5)? != 0 {
            return None;
        }
        let payload = usize::from(word(at + 3)?);
        let rdlen = usize::from(word(at + 9)?);
        let mut opt = at + 11;
        let end = opt + rdlen;
        while opt < end {
            if word(opt)? == OPTION_SUBNET {
                return None;
            }
            opt += 4 + usize::from(word(opt + 2)?);
        }
        if opt != end {
            return None;
        }
        at = end;
        limit = payload.clamp(512, usize::from(EDNS_PAYLOAD));
        edns = true;
    }
    if at != query.len() {
        return None;
    }
    Some((
        Question {
            raw,
            qtype,
            limit,
            edns,
        },
        &lower[..len],
    ))
}

/// Whether wire name `name` is `zone` or below it, at a label boundary.
fn ends_with_label(name: &[u8], zone: &[u8]) -> bool {
    let mut at = 0;
    while at < name.len() {
        if name[at..] == *zone {
            return true;
        }
        at += 1 + usize::from(name[at]);
    }
    false
}

/// `name` (dotted, any case) in lower-case wire format.
pub fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_at_label_boundaries_only() {
        let zone = wire_name("example.test");
        assert!(ends_with_label(&wire_name("www.Example.test."), &zone));
        assert!(ends_with_label(&zone, &zone));
        assert!(!ends_with_label(&wire_name("wwwexample.test"), &zone));
        assert!(!ends_with_label(&wire_name("example.org"), &zone));
        assert_eq!(wire_name("A.b."), [1, b'a', 1, b'b', 0]);
    }
}
