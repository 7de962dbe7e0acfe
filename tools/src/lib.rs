//! Tools around fep: a network-namespace lab (client, gateway, back ends),
//! a tiny HTTP/UDP back-end server, and an HTTP client, shared by the demo
//! (`fep-demo`) and the integration tests.

pub mod admin_client;
pub mod cluster_lab;
pub mod craft;
pub mod dns;
pub mod host;
pub mod http;
pub mod lab;
pub mod netns;
pub mod origin;
pub mod pattern;
pub mod ping;
pub mod sites_lab;
pub mod table;
pub mod top;
pub mod websocket;
