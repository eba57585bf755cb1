//! A namespace's listening TCP sockets from sock_diag (NETLINK_SOCK_DIAG, state LISTEN).
//!
//! /proc/net/tcp walks every bucket of the established-connection hash table on each read()
//! (about 2.5 ms per read on a 24 GiB machine, and a file takes several reads), whatever the
//! namespace holds. A sock_diag dump filtered to LISTEN walks only the listening hash: tens of
//! microseconds. Each refusal line needs its namespace's listeners, so this is on the path
//! from a refusal to its line.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    netlink::{read_u32, transact_on},
    sockets::Listener,
};

/// include/uapi/linux/sock_diag.h and inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;
/// `struct inet_diag_msg`: family, state, timer, retrans (u8 each), then `inet_diag_sockid`
/// (sport and dport big-endian u16, src and dst as four u32, interface, cookie), expires,
/// rqueue, wqueue, uid, inode.
const MSG_LEN: usize = 72;
const SPORT: usize = 4;
const SRC: usize = 8;
const INODE: usize = 68;

/// The TCP listeners (IPv4 and IPv6) of the calling thread's network namespace.
pub fn listeners_here() -> io::Result<Vec<Listener>> {
    let mut all = dump(libc::AF_INET as u8)?;
    // No IPv6 in this kernel is not an error.
    match dump(libc::AF_INET6 as u8) {
        Ok(v6) => all.extend(v6),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    Ok(all)
}

fn dump(family: u8) -> io::Result<Vec<Listener>> {
    // struct inet_diag_req_v2: family, protocol, ext, pad, states (u32), id (48 bytes).
    let mut req = vec![family, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.resize(56, 0);
    let mut found = Vec::new();
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    transact_on(libc::NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, flags, &req, |msg_type, payload| {
        if msg_type == SOCK_DIAG_BY_FAMILY
            && let Some(l) = parse(payload)
        {
            found.push(l);
        }
        Ok(())
    })?;
    Ok(found)
}

fn parse(p: &[u8]) -> Option<Listener> {
    if p.len() < MSG_LEN {
        return None;
    }
    let port = u16::from_be_bytes([p[SPORT], p[SPORT + 1]]);
    let addr = match i32::from(p[0]) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(p[SRC], p[SRC + 1], p[SRC + 2], p[SRC + 3])),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[SRC..SRC + 16]).ok()?)),
        _ => return None,
    };
    Some(Listener { addr, port, inode: u64::from(read_u32(&p[INODE..MSG_LEN])?) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::TcpListener, os::fd::AsRawFd, os::unix::fs::MetadataExt};

    #[test]
    fn parses_an_ipv4_message() {
        let mut p = vec![0u8; MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[SPORT..SPORT + 2].copy_from_slice(&8000u16.to_be_bytes());
        p[SRC..SRC + 4].copy_from_slice(&[127, 0, 0, 1]);
        p[INODE..INODE + 4].copy_from_slice(&77u32.to_ne_bytes());
        let l = parse(&p).unwrap();
        assert_eq!((l.addr, l.port, l.inode), ("127.0.0.1".parse().unwrap(), 8000, 77));
        assert!(parse(&p[..MSG_LEN - 1]).is_none());
    }

    /// Our own listeners, IPv4 and IPv6, are found with their inodes; a connected socket is not.
    #[test]
    fn finds_our_own_listeners() {
        let inode_of = |fd: i32| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let found = listeners_here().unwrap();
        let mine = found.iter().find(|l| l.inode == inode_of(v4.as_raw_fd())).expect("our listener");
        assert_eq!((mine.addr, mine.port), (v4.local_addr().unwrap().ip(), v4.local_addr().unwrap().port()));
        assert!(!found.iter().any(|l| l.inode == inode_of(client.as_raw_fd())));
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            let found = listeners_here().unwrap();
            let mine = found.iter().find(|l| l.inode == inode_of(v6.as_raw_fd())).expect("our IPv6 listener");
            assert_eq!(mine.addr, "::1".parse::<IpAddr>().unwrap());
        }
    }
}
