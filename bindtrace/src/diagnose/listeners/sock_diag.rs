//! A namespace's listening TCP sockets from sock_diag (NETLINK_SOCK_DIAG, state LISTEN), with
//! the IPV6_V6ONLY flag of each IPv6 one.
//!
//! /proc/net/tcp walks every bucket of the established-connection hash table on each read()
//! (about 2.5 ms per read on a 24 GiB machine, and a file takes several reads), whatever the
//! namespace holds. A sock_diag dump filtered to LISTEN walks only the listening hash: tens of
//! microseconds. Each refusal line needs its namespace's listeners, so this is on the path
//! from a refusal to its line.
//!
//! /proc/net/tcp6 does not show IPV6_V6ONLY either. A refusal needs no flag (an IPv4 SYN refused
//! while `[::]:P` listens proves it), but the audit checks before any connection, and `[::]:P`
//! accepts IPv4 unless the flag is set (nginx sets it by default for `listen [::]:80`). The
//! kernel reports INET_DIAG_SKV6ONLY for every IPv6 listener in the same dump.
//!
//! The messages come from netlink-packet-sock-diag; the request loop is the shared one in
//! `crate::netlink`.
use std::io;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::{Listener, Listening, Proto};
use crate::netlink;

/// The listeners (IPv4 and IPv6) of `proto` in the calling thread's network namespace: TCP
/// sockets in LISTEN, UDP sockets bound and unconnected (state CLOSE; a connected one is
/// ESTABLISHED). udp_diag may be a module the kernel loads on the first UDP request (the
/// sock_diag core asks for it by name); without it the dump fails and the caller reads /proc.
pub(super) fn listening_here(proto: Proto) -> io::Result<Listening> {
    let mut found = Listening::default();
    dump(proto, libc::AF_INET as u8, &mut found)?;
    // No IPv6 in this kernel is not an error.
    match dump(proto, libc::AF_INET6 as u8, &mut found) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    Ok(found)
}

fn dump(proto: Proto, family: u8, found: &mut Listening) -> io::Result<()> {
    let (protocol, states) = match proto {
        Proto::Tcp => (libc::IPPROTO_TCP as u8, StateFlags::LISTEN),
        Proto::Udp => (libc::IPPROTO_UDP as u8, StateFlags::CLOSE),
    };
    let req = InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id: if i32::from(family) == libc::AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
    };
    let reply =
        netlink::transact(NETLINK_SOCK_DIAG, NLM_F_REQUEST | NLM_F_DUMP, SockDiagMessage::InetRequest(req))?;
    for msg in reply.messages {
        if let Some((l, v6only)) = parse(&msg) {
            if v6only {
                found.v6only.insert(l.inode);
            }
            found.listeners.push(l);
        }
    }
    Ok(())
}

pub(crate) fn parse(msg: &SockDiagMessage) -> Option<(Listener, bool)> {
    let SockDiagMessage::InetResponse(r) = msg else { return None };
    let v6only = r.nlas.iter().any(|n| matches!(n, Nla::SkV6Only(true)));
    let id = &r.header.socket_id;
    Some((
        Listener { addr: id.source_address, port: id.source_port, inode: u64::from(r.header.inode) },
        v6only,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        net::{IpAddr, TcpListener},
        os::fd::AsRawFd,
        os::unix::fs::MetadataExt,
    };

    fn inode_of(fd: i32) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino()
    }

    /// A SOCK_DIAG_BY_FAMILY reply message (inet_diag_msg + attributes) as the kernel frames it.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(payload);
        msg
    }

    fn decode(datagram: &[u8]) -> Option<(Listener, bool)> {
        let msg = netlink::Messages::new(datagram).next()?.ok()?;
        match msg.decode::<SockDiagMessage>()? {
            netlink_packet_core::NetlinkPayload::InnerMessage(m) => parse(&m),
            _ => None,
        }
    }

    /// include/uapi/linux/sock_diag.h and inet_diag.h: `struct inet_diag_msg` is family, state,
    /// timer, retrans (u8 each), then `inet_diag_sockid` (ports big-endian, src and dst as four
    /// u32, interface, cookie), expires, rqueue, wqueue, uid, inode.
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const MSG_LEN: usize = 72;
    const SPORT: usize = 4;
    const SRC: usize = 8;
    const INODE: usize = 68;

    #[test]
    fn parses_a_message_and_its_v6only_flag() {
        let mut p = vec![0u8; MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[1] = 10; // TCP_LISTEN
        p[SPORT..SPORT + 2].copy_from_slice(&8000u16.to_be_bytes());
        p[SRC..SRC + 4].copy_from_slice(&[127, 0, 0, 1]);
        p[INODE..INODE + 4].copy_from_slice(&77u32.to_ne_bytes());
        let (l, v6only) = decode(&frame(&p)).unwrap();
        assert_eq!((l.addr, l.port, l.inode, v6only), ("127.0.0.1".parse().unwrap(), 8000, 77, false));
        p[0] = libc::AF_INET6 as u8;
        p.extend_from_slice(&[5, 0, 11, 0, 1, 0, 0, 0]);
        assert!(decode(&frame(&p)).unwrap().1);
    }

    /// Truncated or garbage replies are skipped, never a panic.
    #[test]
    fn malformed_replies_are_skipped() {
        let mut p = vec![0u8; MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p.extend_from_slice(&[5, 0, 11, 0, 1, 0, 0, 0]);
        for n in 0..MSG_LEN {
            assert!(decode(&frame(&p[..n])).is_none(), "{n} bytes");
        }
        for n in MSG_LEN..p.len() {
            let _ = decode(&frame(&p[..n]));
        }
        let _ = decode(&frame(&[0xff; 100]));
        let mut bad = p.clone();
        bad[0] = 77; // no such family
        let _ = decode(&frame(&bad));
    }

    /// Our own listeners, IPv4 and IPv6, are found with their inodes; a connected socket is not.
    #[test]
    fn finds_our_own_listeners() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let found = listening_here(Proto::Tcp).unwrap().listeners;
        let mine = found.iter().find(|l| l.inode == inode_of(v4.as_raw_fd())).expect("our listener");
        assert_eq!((mine.addr, mine.port), (v4.local_addr().unwrap().ip(), v4.local_addr().unwrap().port()));
        assert!(!found.iter().any(|l| l.inode == inode_of(client.as_raw_fd())));
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            let found = listening_here(Proto::Tcp).unwrap().listeners;
            let mine = found.iter().find(|l| l.inode == inode_of(v6.as_raw_fd())).expect("our IPv6 listener");
            assert_eq!(mine.addr, "::1".parse::<IpAddr>().unwrap());
        }
    }

    /// Our own bound UDP sockets are found, IPv4 and IPv6; a connected one is not.
    #[test]
    fn finds_our_own_udp_sockets() {
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(bound.local_addr().unwrap()).unwrap();
        let found = match listening_here(Proto::Udp) {
            Ok(found) => found.listeners,
            Err(e) => return eprintln!("skipped: no udp_diag in this kernel ({e})"),
        };
        let mine = found.iter().find(|l| l.inode == inode_of(bound.as_raw_fd())).expect("our UDP socket");
        assert_eq!(mine.port, bound.local_addr().unwrap().port());
        assert!(!found.iter().any(|l| l.inode == inode_of(connected.as_raw_fd())));
        if let Ok(v6) = std::net::UdpSocket::bind("[::1]:0") {
            let found = listening_here(Proto::Udp).unwrap().listeners;
            assert!(found.iter().any(|l| l.inode == inode_of(v6.as_raw_fd())));
        }
    }

    /// The dump in our own namespace flags a V6ONLY listener we open, and not a dual-stack one.
    #[test]
    fn flags_our_own_v6only_listener() {
        let dual = match TcpListener::bind("[::]:0") {
            Ok(l) => l,
            Err(e) => return eprintln!("skipped: no IPv6 here ({e})"),
        };
        let only = v6only_listener();
        let found = listening_here(Proto::Tcp).unwrap().v6only;
        assert!(found.contains(&inode_of(only)), "{found:?}");
        assert!(!found.contains(&inode_of(dual.as_raw_fd())));
        unsafe { libc::close(only) };
    }

    /// A listening `[::]:0` socket with IPV6_V6ONLY set, by hand (std has no setter before bind).
    fn v6only_listener() -> i32 {
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let one: libc::c_int = 1;
            libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, (&raw const one).cast(), 4);
            let mut addr: libc::sockaddr_in6 = std::mem::zeroed();
            addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            assert_eq!(libc::bind(fd, (&raw const addr).cast(), size_of::<libc::sockaddr_in6>() as u32), 0);
            assert_eq!(libc::listen(fd, 1), 0);
            fd
        }
    }
}
