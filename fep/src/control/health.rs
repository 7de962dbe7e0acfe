//! Active health checks: a TCP connect from the gateway to every TCP back
//! end's service port. `health_check_fails` failures in a row take the back
//! end down; one success brings it back.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::model::Spare;
use super::ControlPlane;
use crate::wire::ip_from_addr;

pub async fn run(cp: Arc<ControlPlane>, interval_ms: u64, timeout_ms: u64) {
    let timeout = Duration::from_millis(timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets: BTreeSet<(u16, SocketAddr)> = {
            let state = cp.state();
            let m = &state.model;
            let table = cp.dispatcher().table();
            m.backends
                .iter()
                .filter(|b| m.services[usize::from(b.service)].tcp && b.spare != Spare::Idle)
                .map(|b| {
                    let be = table.backend(b.service, b.index);
                    (b.node, SocketAddr::new(ip_from_addr(&be.addr), b.port))
                })
                .collect()
        };
        let mut checks = JoinSet::new();
        for (node, addr) in targets {
            checks.spawn(async move {
                let ok = matches!(
                    tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
                    Ok(Ok(_))
                );
                (node, addr, ok)
            });
        }
        while let Some(Ok((node, addr, ok))) = checks.join_next().await {
            if !ok {
                tracing::debug!("health check of {addr} failed");
            }
            cp.state().model.health_result(node, addr.port(), ok);
        }
        cp.tick();
    }
}
