//! Which `[::]` listeners of a namespace refuse IPv4 (IPV6_V6ONLY), from sock_diag.
//!
//! /proc/net/tcp6 does not show the flag. A refusal needs no flag (an IPv4 SYN refused while
//! `[::]:P` listens proves it), but the audit checks before any connection, and `[::]:P`
//! accepts IPv4 unless the flag is set (nginx sets it by default for `listen [::]:80`). The
//! kernel reports INET_DIAG_SKV6ONLY for every IPv6 listener in a NETLINK_SOCK_DIAG dump.
use std::{collections::HashSet, io};

use crate::{
    netlink::{Attrs, read_u32, transact_on},
    netns::Netns,
};

/// include/uapi/linux/sock_diag.h and inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_SKV6ONLY: u16 = 11;
/// `struct inet_diag_msg`: family, state, timer, retrans (u8 each), `inet_diag_sockid` (48),
/// expires, rqueue, wqueue, uid, inode (u32 each).
const INET_DIAG_MSG_LEN: usize = 72;
const INODE_OFFSET: usize = 68;
const TCP_LISTEN: u32 = 10;

/// Socket inodes of the IPv6 TCP listeners of `ns` that have IPV6_V6ONLY set.
pub fn v6only_listeners(ns: &Netns) -> io::Result<HashSet<u64>> {
    ns.run(v6only_here)
}

fn v6only_here() -> io::Result<HashSet<u64>> {
    // struct inet_diag_req_v2: family, protocol, ext, pad, states (u32), id (48 bytes).
    let mut req = vec![libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8, 0, 0];
    req.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    req.resize(56, 0);
    let mut found = HashSet::new();
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    transact_on(libc::NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, flags, &req, |msg_type, payload| {
        if msg_type == SOCK_DIAG_BY_FAMILY
            && let Some((inode, v6only)) = parse(payload)
            && v6only
        {
            found.insert(inode);
        }
        Ok(())
    })?;
    Ok(found)
}

fn parse(payload: &[u8]) -> Option<(u64, bool)> {
    let inode = read_u32(payload.get(INODE_OFFSET..INET_DIAG_MSG_LEN)?)?;
    let v6only = Attrs::new(payload.get(INET_DIAG_MSG_LEN..)?)
        .find(|&(ty, _)| ty == INET_DIAG_SKV6ONLY)
        .and_then(|(_, v)| v.first().copied())
        .is_some_and(|v| v != 0);
    Some((u64::from(inode), v6only))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::TcpListener, os::fd::AsRawFd};

    #[test]
    fn parse_reads_inode_and_flag() {
        let mut p = vec![0u8; INET_DIAG_MSG_LEN];
        p[INODE_OFFSET..INODE_OFFSET + 4].copy_from_slice(&4242u32.to_ne_bytes());
        p.extend_from_slice(&[5, 0, 11, 0, 1, 0, 0, 0]);
        assert_eq!(parse(&p), Some((4242, true)));
        assert_eq!(parse(&p[..INET_DIAG_MSG_LEN]), Some((4242, false)));
        assert_eq!(parse(&p[..10]), None);
    }

    /// The dump in our own namespace finds a V6ONLY listener we open, and not a dual-stack one.
    #[test]
    fn finds_our_own_v6only_listener() {
        use std::os::unix::fs::MetadataExt;
        let inode_of = |fd: i32| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino();
        let dual = match TcpListener::bind("[::]:0") {
            Ok(l) => l,
            Err(e) => return eprintln!("skipped: no IPv6 here ({e})"),
        };
        let only = socket2_v6only();
        let found = v6only_here().unwrap();
        assert!(found.contains(&inode_of(only)), "{found:?}");
        assert!(!found.contains(&inode_of(dual.as_raw_fd())));
        unsafe { libc::close(only) };
    }

    /// A listening `[::]:0` socket with IPV6_V6ONLY set, by hand (std has no setter before bind).
    fn socket2_v6only() -> i32 {
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
