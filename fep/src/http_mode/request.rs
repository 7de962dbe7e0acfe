//! What HTTP mode changes in a request and a response on their way through,
//! and what it reads of them to decide: pure functions over `http` types.

use std::net::{IpAddr, SocketAddr};

use fep_shared::{ContentRule, Forwarded};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};

/// The cookie that carries a session's id.
pub const SESSION_COOKIE: &str = "FEPSESSION";

/// Headers of one hop only (RFC 9110 §7.6.1), never forwarded; an upgrade
/// keeps `Connection` and `Upgrade`, which the next hop needs to agree.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Whether the request asks to switch protocols (WebSocket).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Drops hop-by-hop headers (and the ones `Connection` names), keeping an
/// upgrade's `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    for name in HOP_BY_HOP {
        if upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Tells the back end who the client is: `X-Forwarded-For` appended to
/// the client's own list, and/or RFC 7239 `Forwarded` (by = the VIP).
pub fn add_forwarded(headers: &mut HeaderMap, how: Forwarded, client: IpAddr, vip: SocketAddr) {
    if how.x_forwarded_for() {
        let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(list) if !list.trim().is_empty() => format!("{list}, {client}"),
            _ => client.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-forwarded-for", v);
        }
    }
    if how.forwarded() {
        let node = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let element = format!("for={};by={};proto=http", node(client), node(vip.ip()));
        let value = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
            Some(list) if !list.trim().is_empty() => format!("{list}, {element}"),
            _ => element,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(header::FORWARDED, v);
        }
    }
}

/// Whether sending the request twice does no harm (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The host a request names (`Host`, or the URI's authority), without a
/// port, lower case.
pub fn host_of<B>(req: &Request<B>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())?;
    let host = if raw.starts_with('[') {
        raw.split_once(']').map_or(raw, |(h, _)| &h[1..])
    } else {
        raw.split(':').next().unwrap_or(raw)
    };
    Some(host.to_ascii_lowercase())
}

/// The first rule the request matches (host and path prefix).
pub fn matching_rule<'a>(
    rules: &'a [ContentRule],
    host: Option<&str>,
    path: &str,
) -> Option<&'a ContentRule> {
    rules.iter().find(|r| {
        let host_ok = r
            .host
            .as_deref()
            .is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)));
        host_ok && path.starts_with(&r.path_prefix)
    })
}

/// The session id a request carries in its cookie, if any.
pub fn session_id(headers: &HeaderMap) -> Option<u128> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .and_then(|(_, v)| u128::from_str_radix(v.trim(), 16).ok())
}

/// The `Set-Cookie` that starts (`Some(id)`) or ends (`None`) a session.
pub fn session_cookie(id: Option<u128>) -> HeaderValue {
    let text = match id {
        Some(id) => format!("{SESSION_COOKIE}={id:032x}; Path=/; HttpOnly"),
        None => format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly"),
    };
    HeaderValue::from_str(&text).expect("a cookie of hex digits is a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut r = req(&[
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(r.headers_mut(), false);
        let names: Vec<&str> = r.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["accept"]);
    }

    #[test]
    fn an_upgrade_keeps_connection_and_upgrade() {
        let mut r = req(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&r));
        strip_hop_by_hop(r.headers_mut(), true);
        assert_eq!(r.headers()["connection"], "upgrade");
        assert_eq!(r.headers()["upgrade"], "websocket");
        assert!(!is_upgrade(&req(&[("upgrade", "websocket")])));
    }

    #[test]
    fn forwarded_headers_append_to_the_clients_own() {
        let vip: SocketAddr = "10.0.0.100:80".parse().unwrap();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let mut r = req(&[("x-forwarded-for", "203.0.113.1")]);
        add_forwarded(r.headers_mut(), Forwarded::Both, client, vip);
        assert_eq!(r.headers()["x-forwarded-for"], "203.0.113.1, 192.0.2.7");
        assert_eq!(
            r.headers()["forwarded"],
            "for=192.0.2.7;by=10.0.0.100;proto=http"
        );
        let mut r = req(&[]);
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        add_forwarded(r.headers_mut(), Forwarded::Forwarded, v6, vip);
        assert!(r.headers().get("x-forwarded-for").is_none());
        assert_eq!(
            r.headers()["forwarded"],
            "for=\"[2001:db8::7]\";by=10.0.0.100;proto=http"
        );
    }

    #[test]
    fn rules_match_host_without_port_and_path_prefix() {
        let rules = vec![
            ContentRule {
                host: Some("api.example".into()),
                path_prefix: "/v1/".into(),
                nodes: vec!["be1".into()],
            },
            ContentRule {
                host: None,
                path_prefix: "/static/".into(),
                nodes: vec!["be2".into()],
            },
        ];
        let r = req(&[("host", "API.example:8080")]);
        let host = host_of(&r);
        assert_eq!(host.as_deref(), Some("api.example"));
        let hit = |h: Option<&str>, p| matching_rule(&rules, h, p).map(|r| r.nodes[0].as_str());
        assert_eq!(hit(host.as_deref(), "/v1/users"), Some("be1"));
        assert_eq!(hit(Some("other"), "/v1/users"), None);
        assert_eq!(hit(None, "/static/a.css"), Some("be2"));
        assert_eq!(
            host_of(&req(&[("host", "[fd00::1]:80")])).as_deref(),
            Some("fd00::1")
        );
    }

    #[test]
    fn the_session_cookie_round_trips_among_others() {
        let id = 0x1234_5678_9abc_def0_u128;
        let set = session_cookie(Some(id));
        let value = set.to_str().unwrap().split(';').next().unwrap().to_string();
        let r = req(&[("cookie", &format!("a=1; {value}; b=2"))]);
        assert_eq!(session_id(r.headers()), Some(id));
        assert_eq!(
            session_id(req(&[("cookie", "FEPSESSION=zz")]).headers()),
            None
        );
        assert!(session_cookie(None).to_str().unwrap().contains("Max-Age=0"));
    }

    #[test]
    fn only_safe_or_idempotent_methods_are_retried() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }
}
