//! HTTP mode's client side: arbitrary bytes as a client connection, parsed
//! with small limits and put through the request rewriting; nothing may
//! panic, and every answer starts as an HTTP/1.1 response.
#![no_main]

use std::sync::OnceLock;

use fep_shared::{ContentRule, Forwarded, HttpConfig};
use libfuzzer_sys::fuzz_target;

fn config() -> &'static HttpConfig {
    static CFG: OnceLock<HttpConfig> = OnceLock::new();
    CFG.get_or_init(|| HttpConfig {
        max_header_bytes: 2048,
        header_timeout_ms: 200,
        forwarded: Forwarded::Both,
        session_start: Some("/login".into()),
        session_end: Some("/logout".into()),
        rules: vec![ContentRule {
            host: Some("static.example".into()),
            path_prefix: "/img/".into(),
            nodes: vec!["be1".into()],
        }],
        ..HttpConfig::default()
    })
}

fuzz_target!(|data: &[u8]| {
    let out = fep::testing::http_client_edge(config(), data);
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1."),
        "not an HTTP response: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(200)])
    );
});
