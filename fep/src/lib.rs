//! `fep`, the front-end processor of the cluster dispatcher.
//!
//! Layers, from bytes up:
//! - [`wire`]: typed views over IP/TCP/UDP packets in a buffer;
//! - [`clock`]: times on the dispatcher's wrapping millisecond clock;
//! - [`transfer_table`], [`chooser`], [`routes`]: the tables of
//!   document 003 and the choice of a back end;
//! - [`dispatcher`]: the pure data-plane core (`process(packet, now)`);
//! - [`counters`]: per-worker packet and drop counters;
//! - I/O shells: [`tun_io`] (workers on the multi-queue TUN device),
//!   [`netsetup`] (forwarding, routes and policy rules), [`http_server`]
//!   (the bounded TCP listener of the admin API and metrics) and [`daemon`].

pub mod admin;
pub mod atomic_file;
pub(crate) mod chooser;
pub mod clock;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod dispatcher;
pub(crate) mod endpoint_map;
pub mod http_server;
pub mod metrics;
pub mod netsetup;
pub mod routes;
pub mod testing;
pub mod transfer_table;
pub mod tun_io;
pub mod wire;

pub use dispatcher::{Dispatcher, Verdict};
