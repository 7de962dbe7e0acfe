//! The kernel's socket table through netlink sock_diag (what `ss` uses): one
//! dump per query, no parsing of /proc.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{
    nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};

/// TCP states that still carry a client's connection: established, being
/// set up, or closing with data still allowed one way. TIME_WAIT and CLOSE
/// are over.
pub fn live_tcp_states() -> StateFlags {
    StateFlags::ESTABLISHED
        | StateFlags::SYN_RECV
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
}

/// One socket from the dump.
#[derive(Debug, Clone)]
pub struct Sock {
    pub local_port: u16,
    /// The peer, IPv4-mapped addresses given as IPv4.
    pub remote: IpAddr,
    pub remote_port: u16,
    pub inode: u32,
    /// TCP segments received (from tcp_info), when asked for.
    pub segs_in: Option<u32>,
}

/// Offset of `tcpi_segs_in` in `struct tcp_info` (stable kernel ABI).
const TCPI_SEGS_IN: usize = 140;

/// Dumps TCP sockets in `states` (both families).
pub fn tcp(states: StateFlags, with_info: bool) -> io::Result<Vec<Sock>> {
    let ext = if with_info {
        ExtensionFlags::INFO
    } else {
        ExtensionFlags::empty()
    };
    dump(IPPROTO_TCP, states, ext)
}

/// Dumps bound UDP sockets (both families).
pub fn udp() -> io::Result<Vec<Sock>> {
    dump(IPPROTO_UDP, StateFlags::all(), ExtensionFlags::empty())
}

fn dump(protocol: u8, states: StateFlags, ext: ExtensionFlags) -> io::Result<Vec<Sock>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(family, protocol, states.clone(), ext.clone(), &mut out)?;
    }
    Ok(out)
}

fn dump_family(
    family: u8,
    protocol: u8,
    states: StateFlags,
    ext: ExtensionFlags,
    out: &mut Vec<Sock>,
) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ext,
            states,
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket.send(&buf, 0)?;

    let mut rx = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut rx[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let msg =
                <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[offset..size]).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}"))
                })?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let segs_in = r.nlas.iter().find_map(|n| match n {
                        Nla::TcpInfo(bytes) if bytes.len() >= TCPI_SEGS_IN + 4 => {
                            Some(u32::from_ne_bytes(
                                bytes[TCPI_SEGS_IN..TCPI_SEGS_IN + 4]
                                    .try_into()
                                    .expect("4 bytes"),
                            ))
                        }
                        _ => None,
                    });
                    out.push(Sock {
                        local_port: r.header.socket_id.source_port,
                        remote: r.header.socket_id.destination_address.to_canonical(),
                        remote_port: r.header.socket_id.destination_port,
                        inode: r.header.inode,
                        segs_in,
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!(
                        "sock_diag answered an error: {e:?}"
                    )));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
