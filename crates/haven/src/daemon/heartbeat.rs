//! Heartbeats over every link to every member, feeding haven-ha's failure detector.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use haven_ha::membership::MembershipEvent;

use super::Daemon;
use super::protocol::{Heartbeat, HeartbeatAck};

pub const PATH: &str = "/hb";

pub fn link_name(i: usize) -> String {
    format!("link{i}")
}

fn ip_of(addr: &str) -> Option<IpAddr> {
    addr.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// Every `heartbeat_ms`: refresh the member list from the Raft membership, send one
/// heartbeat per peer per link (from that link's local address), and let the detector
/// judge silence. Runs until the daemon stops.
pub async fn run(daemon: Arc<Daemon>) {
    let period = Duration::from_millis(daemon.node.timers.heartbeat_ms);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let members = daemon.members();
        {
            let now = daemon.now();
            let Ok(mut m) = daemon.membership.lock() else {
                return;
            };
            m.set_members(members.iter().map(|(name, info)| {
                (
                    name.as_str(),
                    (0..info.addrs.len()).map(link_name).collect::<Vec<_>>(),
                )
            }));
            // The local node is trivially alive on all of its links.
            for i in 0..daemon.node.addrs.len() {
                m.handle_heartbeat(&daemon.node.name, &link_name(i), now);
            }
            m.handle_timeout(now);
            while let Some(event) = m.poll_event() {
                log_event(&event);
            }
        }
        for (name, info) in members {
            if name == daemon.node.name {
                continue;
            }
            for (i, peer_addr) in info.addrs.iter().enumerate() {
                if daemon.lab.link_cut(&link_name(i)) {
                    continue;
                }
                let Some(local) = daemon.node.addrs.get(i).and_then(|a| ip_of(a)) else {
                    continue;
                };
                let d = daemon.clone();
                let peer_addr = peer_addr.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let hb = Heartbeat {
                        from: d.node.name.clone(),
                        link: link_name(i),
                        incarnation: d.incarnation,
                    };
                    // Only an answer from the daemon whose certificate names `name`
                    // counts as hearing it.
                    let ack: Result<HeartbeatAck, _> = d
                        .hb_rpc
                        .call_node(Some(local), &peer_addr, &name, PATH, &hb)
                        .await;
                    match ack {
                        Ok(ack) if ack.name == name => {
                            d.heard(&name, &link_name(i), ack.incarnation)
                        }
                        Ok(ack) => tracing::warn!(
                            "{peer_addr} answered as {:?}, but the membership says {name:?} is there",
                            ack.name
                        ),
                        Err(e @ haven_net::RpcError::WrongPeer { .. }) => {
                            tracing::warn!("heartbeat to {name} on link{i}: {e}")
                        }
                        Err(e) => tracing::trace!("heartbeat to {name} on link{i}: {e}"),
                    }
                });
            }
        }
    }
}

fn log_event(event: &MembershipEvent) {
    match event {
        MembershipEvent::NodeAlive { node } => tracing::info!("node {node} is alive"),
        MembershipEvent::NodeLost { node } => tracing::warn!("node {node} is lost"),
        MembershipEvent::LinkUp { node, link } => tracing::info!("node {node}: {link} up"),
        MembershipEvent::LinkDown { node, link } => tracing::warn!("node {node}: {link} down"),
    }
}
