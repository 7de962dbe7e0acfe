//! Redirects from a full site to another: the `Location` of a 307, and the
//! hop count it carries in the query string so that full sites stop
//! bouncing a client between them.

use std::net::{IpAddr, SocketAddr};

use hyper::Uri;

/// The query parameter that counts the redirects a client followed.
pub const HOP_PARAM: &str = "fep-hop";

/// Redirects the request has followed (0 without the parameter).
pub fn hops(uri: &Uri) -> u32 {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| {
            pair.strip_prefix(HOP_PARAM)?
                .strip_prefix('=')?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The query without the hop parameter (`None` when nothing is left).
fn query_without_hops(uri: &Uri) -> Option<String> {
    let kept: Vec<&str> = uri
        .query()?
        .split('&')
        .filter(|p| p.split('=').next() != Some(HOP_PARAM))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The same request at `target`, one hop further.
pub fn location(target: SocketAddr, uri: &Uri, hops: u32) -> String {
    let host = match target.ip() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let port = match target.port() {
        80 => String::new(),
        p => format!(":{p}"),
    };
    let rest = match query_without_hops(uri) {
        Some(q) => format!("{q}&"),
        None => String::new(),
    };
    format!(
        "http://{host}{port}{}?{rest}{HOP_PARAM}={}",
        uri.path(),
        hops + 1
    )
}

/// The URI a back end sees: the hop parameter is fep's, not the site's.
pub fn strip(uri: &Uri) -> Option<Uri> {
    if hops(uri) == 0 && !uri.query().is_some_and(|q| q.contains(HOP_PARAM)) {
        return None;
    }
    let path_and_query = match query_without_hops(uri) {
        Some(q) => format!("{}?{q}", uri.path()),
        None => uri.path().to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn the_location_keeps_path_and_query_and_counts_one_more_hop() {
        let to: SocketAddr = "10.9.2.100:80".parse().unwrap();
        assert_eq!(
            location(to, &uri("/a/b"), 0),
            "http://10.9.2.100/a/b?fep-hop=1"
        );
        let u = uri("/a?x=1&fep-hop=1&y=2");
        assert_eq!(hops(&u), 1);
        assert_eq!(
            location(to, &u, hops(&u)),
            "http://10.9.2.100/a?x=1&y=2&fep-hop=2"
        );
        let v6: SocketAddr = "[fd00::1]:8080".parse().unwrap();
        assert_eq!(
            location(v6, &uri("/"), 0),
            "http://[fd00::1]:8080/?fep-hop=1"
        );
    }

    #[test]
    fn back_ends_never_see_the_hop_parameter() {
        assert_eq!(strip(&uri("/a?x=1")), None);
        assert_eq!(strip(&uri("/a?fep-hop=2")).unwrap(), "/a");
        assert_eq!(strip(&uri("/a?x=1&fep-hop=2")).unwrap(), "/a?x=1");
        assert_eq!(hops(&uri("/a?fep-hop=x")), 0);
        assert_eq!(hops(&uri("/a?fep-hops=3")), 0);
    }
}
