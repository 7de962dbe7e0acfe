//! `fep`, the front-end processor of the cluster dispatcher.
//!
//! Layers, from bytes up:
//! - [`wire`]: typed views over IP/TCP/UDP packets in a buffer;
//! - [`clock`]: times on the dispatcher's wrapping millisecond clock;
//! - [`transfer_table`], [`chooser`], [`routes`]: the tables that map a
//!   client to a back end, and the choice of a back end;
//! - [`dispatcher`]: the pure data-plane core (`process(packet, now)`);
//! - [`counters`]: per-worker packet and drop counters;
//! - I/O shells: [`tun_io`] (workers on the multi-queue TUN device),
//!   [`netsetup`] (forwarding, routes and policy rules), [`http_server`]
//!   (the bounded TCP listener of the admin API and metrics) and [`daemon`];
//! - `views`: the admin API's views built from the control state, which
//!   [`admin`] serves.

pub(crate) mod admin;
pub(crate) mod atomic_file;
pub(crate) mod chooser;
pub(crate) mod clock;
pub(crate) mod control;
pub(crate) mod counters;
pub mod daemon;
pub(crate) mod dispatcher;
pub(crate) mod endpoint_map;
pub(crate) mod http_server;
pub(crate) mod metrics;
pub(crate) mod netsetup;
pub(crate) mod routes;
pub mod testing;
pub(crate) mod transfer_table;
pub(crate) mod tun_io;
pub(crate) mod views;
pub(crate) mod wire;

pub use control::startup::{prepare, Start};
pub use dispatcher::{Dispatcher, Verdict, Worker};
