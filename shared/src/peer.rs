//! What front ends say to each other over the fep-to-fep channel. Framing
//! and authentication are the agent protocol's ([`crate::protocol`]: hello
//! with nonces, HMAC-SHA256 under the cluster key over a direction label,
//! the receiver's nonce and the body, sequence numbers, size limits); a
//! request and a reply have their own labels, so neither verifies as the
//! other, and a frame reflected to its sender fails the MAC (other nonce).
//!
//! A connection carries [`PeerRequest::Hello`] first (the asker's name,
//! checked against its address), then requests, each answered before the
//! next; [`PeerRequest::TakeRoutes`] is answered in parts.

use serde::{Deserialize, Serialize};

use crate::api::{GroupView, MoveReport};
use crate::protocol::Message;

/// Routes per [`PeerReply::Routes`] part: 23 bytes each in a route
/// snapshot, twice that in hex, well under the frame limit.
pub const ROUTES_PER_PART: usize = 40_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerRequest {
    /// The first frame: the asking front end's name.
    Hello { fep: String },
    /// Stop holding the group here (its track file goes to 0): the asker
    /// raised its own, so keepalived moves the group to it.
    Release { group: String },
    /// Every route of the group's services, in parts.
    TakeRoutes { group: String },
    /// The routes were copied: delete them here.
    Forget { group: String },
    /// Run a planned move of the group to the receiving front end.
    Move { group: String },
    /// Which groups the receiver holds, their traffic so far, and their
    /// mode and routes there.
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerReply {
    Done,
    /// A part of the group's routes: a route snapshot (service and node
    /// names, client, state), hex-encoded; `done` on the last part.
    Routes {
        snapshot: String,
        done: bool,
    },
    Forgot {
        routes: u64,
    },
    Moved(MoveReport),
    Status {
        groups: Vec<GroupTraffic>,
        /// Its groups as its `fepctl cluster` shows them.
        view: Vec<GroupView>,
    },
    Refused {
        error: String,
    },
}

/// A VIP group as one front end sees it: whether it is the master, and
/// the bytes its services carried there since it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupTraffic {
    pub name: String,
    pub master: bool,
    pub bytes: u64,
}

impl Message for PeerRequest {
    const DIRECTION: &'static [u8] = b"fep->fep request\0";
}

impl Message for PeerReply {
    const DIRECTION: &'static [u8] = b"fep->fep reply\0";
}
