//! docker-proxy's UDP side: which proxy process forwarded a refused datagram.
//!
//! `inet_sock_set_state` never fires for UDP, so the connect tracker has no record of it. But
//! docker-proxy keeps, per client, a UDP socket connected to the container's address and port
//! (for about 90 s after the client's last datagram), in the daemon's network namespace. The
//! refused datagram left through that socket: its local address is the refusal's client address
//! (as the container saw it), its peer the refusal's target. A sock_diag dump of the daemon's
//! namespace's connected UDP sockets finds it, and /proc the process holding it, which must then
//! pass the daemon's proxy checks (`sources/docker/daemon.rs`), as for TCP.
use std::{io, net::SocketAddr, path::Path};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::{
    diagnose::procfs::{self, Holder},
    netlink,
    netns::Netns,
    sources::docker::daemon::Daemon,
};

/// The daemon's proxy process whose connected UDP socket sent from `client` to `target`, if
/// one still holds it, and the inode of the namespace it sent from (the daemon's).
pub(crate) fn proxy_for(daemon: &Daemon, client: SocketAddr, target: SocketAddr) -> Option<(Holder, u64)> {
    let ns = Netns::open(Path::new(&format!("/proc/{}/ns/net", daemon.pid)))
        .map_err(|e| log::debug!("udp proxy lookup: the daemon's namespace: {e}"))
        .ok()?;
    let inodes = ns
        .run(|| connected_udp(client, target))
        .map_err(|e| log::debug!("udp proxy lookup: sock_diag dump: {e}"))
        .ok()?;
    let holders = procfs::holders(&inodes, ns.inode);
    holders.into_values().flatten().find(|h| daemon.owns_proxy(h.pid)).map(|h| (h, ns.inode))
}

/// Inodes of this namespace's connected UDP sockets whose local address is `local` (or a
/// wildcard on its port) and whose peer is `peer`.
fn connected_udp(local: SocketAddr, peer: SocketAddr) -> io::Result<Vec<u64>> {
    let family = if peer.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 } as u8;
    let req = InetRequest {
        family,
        protocol: libc::IPPROTO_UDP as u8,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::ESTABLISHED,
        socket_id: if peer.is_ipv4() { SocketId::new_v4() } else { SocketId::new_v6() },
    };
    let reply =
        netlink::transact(NETLINK_SOCK_DIAG, NLM_F_REQUEST | NLM_F_DUMP, SockDiagMessage::InetRequest(req))?;
    Ok(reply.messages.iter().filter_map(|m| matching(m, local, peer)).collect())
}

fn matching(msg: &SockDiagMessage, local: SocketAddr, peer: SocketAddr) -> Option<u64> {
    let SockDiagMessage::InetResponse(r) = msg else { return None };
    let id = &r.header.socket_id;
    let ours = id.source_port == local.port()
        && (id.source_address == local.ip() || id.source_address.is_unspecified())
        && id.destination_port == peer.port()
        && id.destination_address == peer.ip();
    ours.then_some(u64::from(r.header.inode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::UdpSocket, os::fd::AsRawFd, os::unix::fs::MetadataExt};

    /// A connected UDP socket of this test is found by its two ends, and only by them (needs no
    /// privilege: sock_diag dumps of one's own namespace are open to everyone).
    #[test]
    fn a_connected_socket_is_found_by_both_ends() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", client.as_raw_fd())).unwrap().ino();
        let found = connected_udp(client.local_addr().unwrap(), server.local_addr().unwrap()).unwrap();
        assert_eq!(found, vec![inode]);
        let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(connected_udp(client.local_addr().unwrap(), elsewhere).unwrap().is_empty());
    }
}
