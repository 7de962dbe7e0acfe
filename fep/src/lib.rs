//! `fep`, the front-end processor of the cluster dispatcher.
//!
//! Layers, from bytes up (`ARCHITECTURE.md` has the whole map):
//! `wire` (packet views); `clock`, `counters`, `atomic_file`,
//! `http_server`; the tables `endpoint_map`, `chooser`,
//! `holds`, `transfer_table`, `routes`; `dispatcher` (the pure data-plane
//! core); `netsetup` (the host's set-up: a pure plan and its executor);
//! `control` (everything that decides); `sites` (several sites: checks,
//! the exchange, hand-off plans, the DNS server); `http_mode` (HTTP
//! services' own listeners and server-connection pools); `views` and `metrics`;
//! the I/O shells `tun_io` and `admin`; `daemon` (wiring).

pub(crate) mod admin;
pub(crate) mod atomic_file;
pub(crate) mod chooser;
pub(crate) mod clock;
pub(crate) mod control;
pub(crate) mod counters;
pub mod daemon;
pub(crate) mod dispatcher;
pub(crate) mod endpoint_map;
pub(crate) mod fast_path;
pub(crate) mod holds;
pub(crate) mod http_mode;
pub(crate) mod http_server;
pub(crate) mod metrics;
pub(crate) mod netsetup;
pub(crate) mod routes;
pub(crate) mod sites;
pub mod testing;
pub(crate) mod transfer_table;
pub(crate) mod tun_io;
pub(crate) mod views;
pub(crate) mod wire;

pub use control::startup::{prepare, Start};
pub use dispatcher::{Dispatcher, Verdict, Worker};
