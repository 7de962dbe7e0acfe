//! The authoritative answers, from query bytes to reply bytes: no I/O, so
//! tests drive it directly. Wire encoding and decoding are hickory-proto's.
//!
//! In the zone: A and AAAA for the configured names (their addresses from
//! [`Lookup`]), SOA and NS at the apex, NODATA (NOERROR with the SOA) for
//! other types and empty non-terminals, NXDOMAIN for unknown names; all with
//! AA. Outside it: REFUSED. EDNS(0) is answered in kind and its client
//! subnet, when given, stands for the querier's address.

use std::collections::HashMap;
use std::net::IpAddr;

use fep_shared::sites_config::DnsConfig;
use fep_shared::NameConfig;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::dns_fast::{wire_name, FastZone};

/// Replies over UDP without EDNS fit in this (RFC 1035).
const PLAIN_UDP: usize = 512;
/// The UDP payload this server offers and answers up to (the DNS flag
/// day's size, which avoids fragments).
pub const EDNS_PAYLOAD: u16 = 1232;
/// A query is one question: anything longer than this is not one.
pub const MAX_QUERY: usize = 4096;
/// SOA timers: refresh, retry, expire. Secondaries are not used; the
/// values only have to be sane.
const SOA_TIMERS: (i32, i32, i32) = (3600, 600, 86_400);

/// Where a name's addresses come from: the live hand-off plans.
pub trait Lookup {
    /// Appends the addresses to answer for name `name` (index in the
    /// config), family `v6`, for a querier at `client`, to `out`.
    fn addresses(&self, name: usize, v6: bool, client: IpAddr, out: &mut Vec<IpAddr>);
}

/// What became of one datagram or TCP message, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reply {
    Answered(Class),
    /// Too short to hold a header, or a response: nothing is sent back.
    Dropped,
}

/// Answers as counted: the label of `fep_dns_queries_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    NoError,
    NoData,
    NxDomain,
    Refused,
    FormErr,
    NotImp,
    BadVers,
    Truncated,
}

impl Class {
    pub const ALL: [Class; 8] = [
        Class::NoError,
        Class::NoData,
        Class::NxDomain,
        Class::Refused,
        Class::FormErr,
        Class::NotImp,
        Class::BadVers,
        Class::Truncated,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Class::NoError => "noerror",
            Class::NoData => "nodata",
            Class::NxDomain => "nxdomain",
            Class::Refused => "refused",
            Class::FormErr => "formerr",
            Class::NotImp => "notimp",
            Class::BadVers => "badvers",
            Class::Truncated => "truncated",
        }
    }
}

/// The zone as configured: built once, read by every query.
#[derive(Debug, Clone)]
pub struct Zone {
    apex: Name,
    soa: Record,
    ns: Vec<Record>,
    names: HashMap<Name, usize>,
    ttls: Vec<u32>,
    /// The name servers' own addresses inside the zone, by name.
    ns_addresses: HashMap<Name, Vec<Record>>,
    /// The common queries' path (see `dns_fast`).
    fast: FastZone,
}

/// A DNS server thread's reused buffers.
#[derive(Debug, Default)]
pub struct Scratch {
    addrs: Vec<IpAddr>,
}

impl Zone {
    pub fn new(dns: &DnsConfig, names: &[NameConfig]) -> Result<Zone, String> {
        let parse = |what: &str, s: &str| {
            Name::from_ascii(s)
                .map(|n| fqdn(&n))
                .map_err(|e| format!("{what} '{s}' is not a DNS name: {e}"))
        };
        let apex = parse("sites.dns.zone", &dns.zone)?;
        let ns_names = dns
            .ns
            .iter()
            .map(|n| parse("sites.dns.ns", n))
            .collect::<Result<Vec<_>, _>>()?;
        let hostmaster = match dns.hostmaster.contains('.') {
            true => parse("sites.dns.hostmaster", &dns.hostmaster)?,
            false => parse(
                "sites.dns.hostmaster",
                &format!("{}.{}", dns.hostmaster, dns.zone),
            )?,
        };
        let (refresh, retry, expire) = SOA_TIMERS;
        // The serial only has to grow when the zone's data does; the
        // answers are computed, so one per start is enough.
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        let soa = Record::from_rdata(
            apex.clone(),
            dns.negative_ttl_s,
            RData::SOA(SOA::new(
                ns_names[0].clone(),
                hostmaster,
                serial,
                refresh,
                retry,
                expire,
                dns.negative_ttl_s,
            )),
        );
        let ns = ns_names
            .into_iter()
            .map(|n| Record::from_rdata(apex.clone(), 3600, RData::NS(NS(n))))
            .collect();
        let mut index = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            index.insert(parse("sites.name.name", &n.name)?, i);
        }
        let mut ns_addresses = HashMap::new();
        for (name, addrs) in &dns.ns_addresses {
            let owner = parse("sites.dns.ns_addresses", name)?;
            let records = addrs
                .iter()
                .map(|&a| Record::from_rdata(owner.clone(), 3600, rdata_of(a)))
                .collect();
            ns_addresses.insert(owner, records);
        }
        Ok(Zone {
            fast: fast_zone(dns, names, &soa)?,
            apex,
            soa,
            ns,
            names: index,
            ttls: names.iter().map(|n| n.ttl_s).collect(),
            ns_addresses,
        })
    }

    /// The reply to a UDP `query` from `src` in `out` (empty: nothing to
    /// send): the common queries without an allocation, the rest by
    /// [`Zone::answer`].
    pub fn answer_udp(
        &self,
        query: &[u8],
        src: IpAddr,
        lookup: &impl Lookup,
        scratch: &mut Scratch,
        out: &mut Vec<u8>,
    ) -> Reply {
        if let Some(class) = self
            .fast
            .answer(query, src, lookup, &mut scratch.addrs, out)
        {
            return Reply::Answered(class);
        }
        let (reply, outcome) = self.answer(query, src, false, lookup);
        out.clear();
        out.extend_from_slice(reply.as_deref().unwrap_or_default());
        outcome
    }

    /// The reply to `query` from `src` (over TCP when `tcp`), or nothing.
    pub fn answer(
        &self,
        query: &[u8],
        src: IpAddr,
        tcp: bool,
        lookup: &impl Lookup,
    ) -> (Option<Vec<u8>>, Reply) {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            // No header, or a response: answering could start a loop.
            return (None, Reply::Dropped);
        }
        let id = u16::from_be_bytes([query[0], query[1]]);
        let request = match (query.len() <= MAX_QUERY)
            .then(|| Message::from_vec(query).ok())
            .flatten()
        {
            Some(m) => m,
            None => return self.error(id, OpCode::Query, ResponseCode::FormErr, Class::FormErr),
        };
        let op = request.metadata.op_code;
        if request.metadata.message_type != MessageType::Query {
            return (None, Reply::Dropped);
        }
        let mut reply = Message::response(id, op);
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.add_queries(request.queries.iter().cloned());
        let limit = match (&request.edns, tcp) {
            (_, true) => usize::from(u16::MAX),
            (Some(e), false) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
            (None, false) => PLAIN_UDP,
        };
        if let Some(edns) = &request.edns {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_PAYLOAD);
            if edns.version() > 0 {
                reply.metadata.response_code = ResponseCode::BADVERS;
                reply.set_edns(ours);
                return self.finish(reply, limit, Class::BadVers);
            }
            reply.set_edns(ours);
        }
        if op != OpCode::Query {
            reply.metadata.response_code = ResponseCode::NotImp;
            return self.finish(reply, limit, Class::NotImp);
        }
        let [q] = request.queries.as_slice() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return self.finish(reply, limit, Class::FormErr);
        };
        let client = match client_subnet(request.edns.as_ref()) {
            Ok(Some(subnet)) => {
                // RFC 7871: the answer holds for the prefix it was asked for.
                let scope = subnet.source_prefix();
                let mut echo = subnet;
                echo.set_scope_prefix(scope);
                if let Some(e) = reply.edns.as_mut() {
                    e.options_mut().insert(EdnsOption::Subnet(echo));
                }
                subnet.addr()
            }
            Ok(None) => src,
            Err(()) => {
                reply.metadata.response_code = ResponseCode::FormErr;
                return self.finish(reply, limit, Class::FormErr);
            }
        };
        let class = self.resolve(q, client, lookup, &mut reply);
        self.finish(reply, limit, class)
    }

    /// Fills `reply`'s sections for the one question `q`.
    fn resolve(
        &self,
        q: &Query,
        client: IpAddr,
        lookup: &impl Lookup,
        reply: &mut Message,
    ) -> Class {
        let name = fqdn(q.name());
        if q.query_class() != DNSClass::IN || !self.apex.zone_of(&name) {
            reply.metadata.response_code = ResponseCode::Refused;
            return Class::Refused;
        }
        reply.metadata.authoritative = true;
        let qtype = q.query_type();
        let mut answers: Vec<Record> = Vec::new();
        if name == self.apex {
            match qtype {
                RecordType::SOA => answers.push(self.soa.clone()),
                RecordType::NS => answers.extend(self.ns.iter().cloned()),
                _ => {}
            }
        }
        if let Some(glue) = self.ns_addresses.get(&name) {
            let want = |r: &&Record| r.record_type() == qtype;
            answers.extend(glue.iter().filter(want).map(|r| {
                let mut r = r.clone();
                r.name = q.name().clone();
                r
            }));
        } else if let Some(&i) = self.names.get(&name) {
            let v6 = match qtype {
                RecordType::A => Some(false),
                RecordType::AAAA => Some(true),
                _ => None,
            };
            if let Some(v6) = v6 {
                let ttl = self.ttls[i];
                let mut addrs = Vec::new();
                lookup.addresses(i, v6, client, &mut addrs);
                answers.extend(
                    addrs
                        .into_iter()
                        .map(|a| Record::from_rdata(q.name().clone(), ttl, rdata_of(a))),
                );
            }
        } else if name != self.apex && !self.names.keys().any(|n| name.zone_of(n)) {
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.add_authority(self.soa.clone());
            return Class::NxDomain;
        }
        if answers.is_empty() {
            // The name exists (or has names below it) without this type.
            reply.add_authority(self.soa.clone());
            return Class::NoData;
        }
        if qtype == RecordType::NS && name == self.apex {
            // Glue: where the name servers just named are.
            reply.add_additionals(self.ns_addresses.values().flatten().cloned());
        }
        reply.add_answers(answers);
        Class::NoError
    }

    fn error(
        &self,
        id: u16,
        op: OpCode,
        code: ResponseCode,
        class: Class,
    ) -> (Option<Vec<u8>>, Reply) {
        self.finish(Message::error_msg(id, op, code), PLAIN_UDP, class)
    }

    /// Encodes `reply`; one too large for `limit` goes out truncated (TC,
    /// no records) so the client asks again over TCP.
    fn finish(&self, mut reply: Message, limit: usize, class: Class) -> (Option<Vec<u8>>, Reply) {
        match reply.to_vec() {
            Ok(bytes) if bytes.len() <= limit => (Some(bytes), Reply::Answered(class)),
            Ok(_) => {
                reply.answers.clear();
                reply.authorities.clear();
                reply.additionals.clear();
                reply.metadata.truncation = true;
                let bytes = reply.to_vec().ok();
                (bytes, Reply::Answered(Class::Truncated))
            }
            Err(e) => {
                tracing::warn!("cannot encode a DNS reply: {e}");
                (None, Reply::Dropped)
            }
        }
    }
}

/// The query's client subnet option: `Err` for one that breaks RFC 7871's
/// rules (a prefix longer than its family).
fn client_subnet(edns: Option<&Edns>) -> Result<Option<ClientSubnet>, ()> {
    let Some(EdnsOption::Subnet(s)) = edns.and_then(|e| e.option(EdnsCode::Subnet)) else {
        return Ok(None);
    };
    let max = if s.addr().is_ipv4() { 32 } else { 128 };
    match s.source_prefix() <= max && s.scope_prefix() == 0 {
        true => Ok(Some(*s)),
        false => Err(()),
    }
}

/// The fast path's view of the zone: names in wire form, the names it
/// leaves to the general path, the SOA record without name compression.
fn fast_zone(dns: &DnsConfig, names: &[NameConfig], soa: &Record) -> Result<FastZone, String> {
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
    let mut soa_wire = Vec::new();
    let mut enc = BinEncoder::new(&mut soa_wire);
    enc.set_canonical_form(true);
    soa.emit(&mut enc)
        .map_err(|e| format!("encoding the SOA record: {e}"))?;
    let apex = wire_name(&dns.zone);
    // The apex, the name servers, and every name above a configured one
    // (an empty non-terminal: NODATA, not NXDOMAIN).
    let mut special = vec![apex.clone()];
    special.extend(dns.ns.iter().map(|n| wire_name(n)));
    for n in names {
        let labels: Vec<&str> = n.name.trim_end_matches('.').split('.').collect();
        special.extend((1..labels.len()).map(|i| wire_name(&labels[i..].join("."))));
    }
    Ok(FastZone::new(
        names.iter().map(|n| (wire_name(&n.name), n.ttl_s)),
        apex,
        special,
        soa_wire,
    ))
}

fn rdata_of(a: IpAddr) -> RData {
    match a {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    }
}

/// `name` in lower case, fully qualified: the form names are compared in.
fn fqdn(name: &Name) -> Name {
    let mut n = name.to_lowercase();
    n.set_fqdn(true);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Lookup for Fixed {
        fn addresses(&self, name: usize, v6: bool, client: IpAddr, out: &mut Vec<IpAddr>) {
            let pacific = client.to_string().starts_with("211.");
            let addrs: &[&str] = match (name, v6, pacific) {
                (_, true, _) => &["fd00::1"],
                (0, false, true) => &["211.0.0.1"],
                (0, false, false) => &["10.0.0.1", "10.0.0.2"],
                _ => &[],
            };
            out.extend(addrs.iter().map(|a| a.parse::<IpAddr>().unwrap()));
        }
    }

    fn zone() -> Zone {
        let dns: DnsConfig = toml::from_str(
            "listen = [\"127.0.0.1:53\"]\nzone = \"Example.Test\"\nns = [\"ns1.example.test\"]\n\
             ns_addresses = { \"ns1.example.test\" = [\"192.0.2.53\"] }\n",
        )
        .unwrap();
        let name: NameConfig = toml::from_str(
            "name = \"www.example.test\"\nport = 80\nttl_s = 30\n[[at]]\nsite = \"a\"\nvips = [\"10.0.0.1\"]\n",
        )
        .unwrap();
        let deep: NameConfig = toml::from_str(
            "name = \"a.b.example.test\"\nport = 80\n[[at]]\nsite = \"a\"\nvips = [\"10.0.0.1\"]\n",
        )
        .unwrap();
        Zone::new(&dns, &[name, deep]).unwrap()
    }

    fn ask(name: &str, t: RecordType, edns: Option<Edns>) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if let Some(e) = edns {
            q.set_edns(e);
        }
        let (bytes, _) = zone().answer(
            &q.to_vec().unwrap(),
            "10.0.1.2".parse().unwrap(),
            false,
            &Fixed,
        );
        Message::from_vec(&bytes.expect("an answer")).unwrap()
    }

    fn addrs(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_configured_name_answers_authoritatively_in_order_with_its_ttl() {
        let m = ask("WWW.example.test.", RecordType::A, None);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert!(!m.metadata.recursion_available);
        assert_eq!(addrs(&m), ["10.0.0.1", "10.0.0.2"]);
        assert!(m.answers.iter().all(|r| r.ttl == 30));
        assert_eq!(
            addrs(&ask("www.example.test", RecordType::AAAA, None)),
            ["fd00::1"]
        );
    }

    #[test]
    fn soa_ns_nodata_nxdomain_and_refused() {
        let soa = ask("example.test", RecordType::SOA, None);
        assert!(matches!(soa.answers[0].data, RData::SOA(_)));
        let ns = ask("example.test", RecordType::NS, None);
        assert!(matches!(ns.answers[0].data, RData::NS(_)));
        assert_eq!(ns.additionals.len(), 1, "glue for ns1");
        let glue = ask("NS1.example.test", RecordType::A, None);
        assert_eq!(addrs(&glue), ["192.0.2.53"]);
        assert!(glue.metadata.authoritative);
        for (name, t) in [
            ("www.example.test", RecordType::MX),
            ("b.example.test", RecordType::A),
        ] {
            let m = ask(name, t, None);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(m.answers.is_empty() && m.metadata.authoritative);
            assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        }
        let nx = ask("nope.example.test", RecordType::A, None);
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(nx.metadata.authoritative);
        let other = ask("www.example.org", RecordType::A, None);
        assert_eq!(other.metadata.response_code, ResponseCode::Refused);
        assert!(!other.metadata.authoritative && other.answers.is_empty());
    }

    #[test]
    fn edns_is_answered_in_kind_and_its_client_subnet_stands_for_the_client() {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        e.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
            "211.123.11.0".parse().unwrap(),
            24,
            0,
        )));
        let m = ask("www.example.test", RecordType::A, Some(e));
        assert_eq!(addrs(&m), ["211.0.0.1"]);
        let edns = m.edns.expect("an OPT record");
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        let Some(EdnsOption::Subnet(s)) = edns.option(EdnsCode::Subnet) else {
            panic!("no client subnet echoed");
        };
        assert_eq!((s.source_prefix(), s.scope_prefix()), (24, 24));
        let mut v1 = Edns::new();
        v1.set_version(1);
        let m = ask("www.example.test", RecordType::A, Some(v1));
        // 16 is BADVERS in an OPT record (BADSIG is the same number).
        assert_eq!(u16::from(m.metadata.response_code), 16);
    }

    #[test]
    fn hostile_bytes_get_formerr_or_nothing_and_never_a_panic() {
        let z = zone();
        let src: IpAddr = "10.0.1.2".parse().unwrap();
        assert_eq!(z.answer(&[0; 5], src, false, &Fixed).1, Reply::Dropped);
        // A response is never answered.
        let mut resp = [0u8; 12];
        resp[2] = 0x80;
        assert_eq!(z.answer(&resp, src, false, &Fixed).1, Reply::Dropped);
        // A header claiming a question that is not there.
        let mut bad = [0u8; 12];
        bad[0] = 0x12;
        bad[5] = 1;
        let (bytes, reply) = z.answer(&bad, src, false, &Fixed);
        assert_eq!(reply, Reply::Answered(Class::FormErr));
        let m = Message::from_vec(&bytes.unwrap()).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0x1200, ResponseCode::FormErr)
        );
        // Oversized, and every prefix of a real query, and random bytes.
        let big = vec![0u8; MAX_QUERY + 1];
        assert_eq!(
            z.answer(&big, src, false, &Fixed).1,
            Reply::Answered(Class::FormErr)
        );
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("www.example.test").unwrap(),
            RecordType::A,
        ));
        let good = q.to_vec().unwrap();
        for n in 0..good.len() {
            let _ = z.answer(&good[..n], src, false, &Fixed);
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..40)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = z.answer(&bytes, src, false, &Fixed);
        }
    }

    /// What a client reads of a reply, for comparing the two paths.
    fn read(bytes: &[u8]) -> String {
        let m = Message::from_vec(bytes).unwrap();
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?}",
            m.metadata,
            m.queries,
            m.answers,
            m.authorities,
            m.additionals,
            m.edns
                .map(|e| (e.max_payload(), e.version(), e.options().as_ref().len()))
        )
    }

    #[test]
    fn the_fast_path_takes_the_common_queries_and_answers_as_the_general_path_does() {
        let z = zone();
        let src: IpAddr = "10.0.1.2".parse().unwrap();
        let mut big = Edns::new();
        big.set_max_payload(4096);
        let mut small = Edns::new();
        small.set_max_payload(100);
        let cases = [
            ("www.example.test", RecordType::A, None, true),
            ("WwW.Example.TEST.", RecordType::A, Some(big.clone()), true),
            (
                "www.example.test",
                RecordType::AAAA,
                Some(big.clone()),
                true,
            ),
            ("www.example.test", RecordType::MX, None, true),
            ("nope.example.test", RecordType::A, Some(big.clone()), true),
            ("x.y.example.test", RecordType::AAAA, None, true),
            // The general path's: the apex, a name server, an empty
            // non-terminal, another zone.
            ("example.test", RecordType::SOA, None, false),
            ("ns1.example.test", RecordType::A, None, false),
            ("b.example.test", RecordType::A, None, false),
            ("www.example.org", RecordType::A, None, false),
        ];
        for (name, t, edns, fast) in cases {
            let mut q = Message::query();
            q.metadata.recursion_desired = true;
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
            if let Some(e) = edns {
                q.set_edns(e);
            }
            let bytes = q.to_vec().unwrap();
            let (general, _) = z.answer(&bytes, src, false, &Fixed);
            let mut out = Vec::new();
            let took = z
                .fast
                .answer(&bytes, src, &Fixed, &mut Vec::new(), &mut out);
            assert_eq!(took.is_some(), fast, "{name} {t}");
            let reply = z.answer_udp(&bytes, src, &Fixed, &mut Scratch::default(), &mut out);
            assert!(matches!(reply, Reply::Answered(_)));
            assert_eq!(read(&out), read(&general.unwrap()), "{name} {t}");
        }
        // A payload below 512 counts as 512 on both paths.
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("www.example.test").unwrap(),
            RecordType::A,
        ));
        q.set_edns(small);
        let bytes = q.to_vec().unwrap();
        let mut out = Vec::new();
        z.answer_udp(&bytes, src, &Fixed, &mut Scratch::default(), &mut out);
        assert_eq!(
            read(&out),
            read(&z.answer(&bytes, src, false, &Fixed).0.unwrap())
        );
    }

    #[test]
    fn two_questions_are_a_format_error() {
        let mut q = Message::query();
        for n in ["www.example.test", "example.test"] {
            q.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        let (bytes, reply) = zone().answer(
            &q.to_vec().unwrap(),
            "10.0.1.2".parse().unwrap(),
            false,
            &Fixed,
        );
        assert_eq!(reply, Reply::Answered(Class::FormErr));
        assert!(bytes.is_some());
    }
}
