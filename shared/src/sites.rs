//! What sites tell each other over the site-state exchange. Framing and
//! authentication are the agent protocol's ([`crate::protocol`]: hello with
//! nonces, HMAC-SHA256 under the sites' key over a direction label, the
//! receiver's nonce and the body, sequence numbers, size limits).
//!
//! A connection carries [`SiteMsg::Hello`] first (the sender's site name,
//! checked against its address), then [`SiteMsg::State`] updates, one way.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::protocol::Message;

/// Largest site-state frame: 64 sites × 1,024 names stay far below it.
pub const MAX_STATE_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteMsg {
    Hello { site: String },
    State(SiteState),
}

/// One site's view, whole in every update: later updates replace it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteState {
    /// Why it was sent now: periodic, or the event that triggered it.
    pub reason: String,
    pub names: Vec<NameState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameState {
    pub name: String,
    /// The sender's averaged response time to each site's VIP for this
    /// name (`None`: down as the sender sees it, or not checked yet).
    pub rtt_ms: Vec<SiteRtt>,
    /// The sender's own VIPs for this name.
    pub vips: Vec<VipState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRtt {
    pub site: String,
    pub ms: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipState {
    pub vip: IpAddr,
    /// Connections it may still take (`None`: no limit configured).
    pub remaining: Option<u64>,
    pub capacity: Option<u64>,
    /// A back end with a ratio above 0: without one the site is down for
    /// this VIP, whatever its listener answers to a check.
    pub healthy: bool,
    /// Healthy and not at its limit: it takes new clients.
    pub room: bool,
}

impl Message for SiteMsg {
    const DIRECTION: &'static [u8] = b"site->site state\0";
}
