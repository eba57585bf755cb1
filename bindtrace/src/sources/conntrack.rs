//! NATed connections, from conntrack destroy events (ctnetlink).
//!
//! A connection to a published port from another machine (or with Docker's userland proxy
//! off) is DNATed in the host's namespace to the container's address, and the refusal seen
//! inside the container shows only the translated addresses. Conntrack knows the original
//! ones, but when the container answers the SYN with a reset, netfilter deletes the entry at
//! once (a connection whose only reply is a RST is killed immediately): a lookup afterwards finds
//! nothing. The destroy event still carries both tuples, so bindtrace follows
//! NFNLGRP_CONNTRACK_DESTROY and keeps, for a short while, the NATed TCP flows whose reply comes
//! from a watched prefix, keyed by their reply tuple, which is exactly the refusal's
//! (container address, client address as the container saw it).
//!
//! Our own small netlink code (`netlink.rs`), like the rtnetlink client: the few attributes
//! needed do not justify a dependency.
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    netlink::{Attrs, Messages, NlSocket, read_u16, read_u32, setsockopt_int},
    netns::prefixes::{Prefix, prefix_contains},
};

/// include/uapi/linux/netfilter/nfnetlink.h and nfnetlink_conntrack.h.
const NFNLGRP_CONNTRACK_DESTROY: libc::c_int = 3;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// `struct nfgenmsg`: family u8, version u8, res_id be16.
const NFGENMSG_LEN: usize = 4;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// How long a NATed flow is kept for a refusal line to find it. Lines are written within
/// milliseconds of the refusal; folded lines use their latest sample, at most a fold window old.
const KEEP: Duration = Duration::from_secs(30);
/// Bound on the flows kept (the oldest go first).
const MAX_FLOWS: usize = 4096;
/// Receive buffer: every connection of the host ends in a destroy event, so ask for room.
const RCVBUF: libc::c_int = 4 << 20;

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Tuple {
    pub(crate) src: SocketAddr,
    pub(crate) dst: SocketAddr,
}

/// A TCP connection whose addresses were translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NatFlow {
    /// As the client sent it: the client's address and the published address it dialed.
    pub(crate) orig: Tuple,
    /// As the container answered: the container's address and the client as it saw it.
    pub(crate) reply: Tuple,
}

impl NatFlow {
    pub(crate) fn is_dnat(&self) -> bool {
        self.orig.dst != self.reply.src
    }
}

/// NATed flows seen lately, by reply tuple, and the prefixes worth keeping.
#[derive(Default)]
struct Flows {
    by_reply: HashMap<Tuple, (NatFlow, Instant)>,
    order: VecDeque<(Tuple, Instant)>,
    prefixes: BTreeSet<Prefix>,
    overruns: u64,
}

impl Flows {
    fn wanted(&self, flow: &NatFlow) -> bool {
        (flow.orig.dst != flow.reply.src || flow.orig.src != flow.reply.dst)
            && self.prefixes.iter().any(|p| prefix_contains(p, flow.reply.src.ip()))
    }

    fn remember(&mut self, flow: NatFlow, now: Instant) {
        self.by_reply.insert(flow.reply, (flow, now));
        self.order.push_back((flow.reply, now));
        while self.order.len() > MAX_FLOWS {
            if let Some((key, at)) = self.order.pop_front()
                && self.by_reply.get(&key).is_some_and(|(_, t)| *t == at)
            {
                self.by_reply.remove(&key);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(key, at)) = self.order.front() {
            if now.duration_since(at) < KEEP {
                break;
            }
            self.order.pop_front();
            if self.by_reply.get(&key).is_some_and(|(_, t)| *t == at) {
                self.by_reply.remove(&key);
            }
        }
    }
}

/// The detector's view of conntrack: a task reads the destroy events as they come (on the
/// same runtime, so awaiting anything lets it catch up) and this handle looks flows up.
#[derive(Clone)]
pub(crate) struct Conntrack {
    flows: Arc<Mutex<Flows>>,
}

impl Conntrack {
    /// Subscribes to conntrack destroy events of this thread's network namespace (needs
    /// CAP_NET_ADMIN) and starts reading them on the current tokio runtime. Fails when the
    /// kernel has no conntrack netlink support.
    pub(crate) fn spawn() -> io::Result<Conntrack> {
        let sock = NlSocket::open_with(libc::NETLINK_NETFILTER, true)?;
        let fd = sock.fd;
        setsockopt_int(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            NFNLGRP_CONNTRACK_DESTROY,
        )?;
        if setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
            let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF);
        }
        // SAFETY: the OwnedFd stays open and keeps its number until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?;
        let flows: Arc<Mutex<Flows>> = Arc::default();
        let reader = flows.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let result = match fd.readable().await {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        drain(guard.get_inner().as_raw_fd(), &mut buf, &reader)
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    log::warn!("conntrack events stopped ({e}): `via` dnat is no longer reported");
                    return;
                }
            }
        });
        Ok(Conntrack { flows })
    }

    /// Only flows answered from these prefixes (the watched bridges) are kept.
    pub(crate) fn set_prefixes(&self, prefixes: &BTreeSet<Prefix>) {
        if let Ok(mut f) = self.flows.lock() {
            f.prefixes = prefixes.clone();
        }
    }

    /// The NATed flow the container at `target` answered for `client` (as it saw the client).
    pub(crate) fn flow(&self, target: SocketAddr, client: SocketAddr) -> Option<NatFlow> {
        let f = self.flows.lock().ok()?;
        f.by_reply.get(&Tuple { src: target, dst: client }).map(|(flow, _)| *flow)
    }
}

/// Reads every queued event without blocking.
fn drain(fd: RawFd, buf: &mut [u8], flows: &Mutex<Flows>) -> io::Result<()> {
    let now = Instant::now();
    let mut flows = flows.lock().map_err(|_| io::Error::other("conntrack state poisoned"))?;
    loop {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => break,
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    // Events were dropped (a burst of connections ended): the flows we missed
                    // show as `via` unknown, nothing worse.
                    flows.overruns += 1;
                    if flows.overruns.is_power_of_two() {
                        log::debug!("conntrack events overran {} times", flows.overruns);
                    }
                    continue;
                }
                _ => return Err(err),
            }
        }
        let len = (n as usize).min(buf.len());
        for msg in Messages::new(&buf[..len]).map_while(Result::ok) {
            if msg.msg_type != (NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE) {
                continue;
            }
            if let Some(flow) = parse_destroy(msg.payload)
                && flows.wanted(&flow)
            {
                flows.remember(flow, now);
            }
        }
    }
    flows.expire(now);
    Ok(())
}

/// Both tuples of a TCP destroy event.
fn parse_destroy(payload: &[u8]) -> Option<NatFlow> {
    let attrs = payload.get(NFGENMSG_LEN..)?;
    let mut orig = None;
    let mut reply = None;
    for (ty, value) in Attrs::new(attrs) {
        match ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(value),
            CTA_TUPLE_REPLY => reply = parse_tuple(value),
            _ => {}
        }
    }
    Some(NatFlow { orig: orig?, reply: reply? })
}

/// A TCP tuple; None for other protocols.
fn parse_tuple(value: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for (ty, v) in Attrs::new(value) {
        match ty {
            CTA_TUPLE_IP => {
                for (t, a) in Attrs::new(v) {
                    match t {
                        CTA_IP_V4_SRC => src = v4(a),
                        CTA_IP_V4_DST => dst = v4(a),
                        CTA_IP_V6_SRC => src = v6(a),
                        CTA_IP_V6_DST => dst = v6(a),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (t, a) in Attrs::new(v) {
                    match t {
                        CTA_PROTO_NUM => proto = a.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = read_u16(a).map(u16::from_be),
                        CTA_PROTO_DST_PORT => dport = read_u16(a).map(u16::from_be),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if proto? != libc::IPPROTO_TCP as u8 {
        return None;
    }
    Some(Tuple { src: SocketAddr::new(src?, sport?), dst: SocketAddr::new(dst?, dport?) })
}

fn v4(a: &[u8]) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::from(read_u32(a)?.to_ne_bytes())))
}

fn v6(a: &[u8]) -> Option<IpAddr> {
    let b: [u8; 16] = a.get(..16)?.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | libc::NLA_F_NESTED as u16, &parts.concat())
    }

    fn tuple(ty: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        nested(
            ty,
            &[
                nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)]),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn parses_a_dnat_destroy_event() {
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(tuple(CTA_TUPLE_ORIG, [10, 9, 0, 2], [10, 9, 0, 1], 40000, 8000));
        payload.extend(tuple(CTA_TUPLE_REPLY, [172, 17, 0, 2], [10, 9, 0, 2], 8000, 40000));
        payload.extend(attr(3, &[0, 0, 0, 1])); // CTA_STATUS, ignored
        let flow = parse_destroy(&payload).unwrap();
        assert_eq!(flow.orig.src, "10.9.0.2:40000".parse().unwrap());
        assert_eq!(flow.orig.dst, "10.9.0.1:8000".parse().unwrap());
        assert_eq!(flow.reply.src, "172.17.0.2:8000".parse().unwrap());
        assert!(flow.is_dnat());
    }

    #[test]
    fn only_nated_flows_from_watched_prefixes_are_kept() {
        let t = |a: &str, b: &str| Tuple { src: a.parse().unwrap(), dst: b.parse().unwrap() };
        let mut f = Flows::default();
        f.prefixes.insert(crate::netns::prefixes::prefix_of("172.17.0.1".parse().unwrap(), 16));
        let dnat = NatFlow {
            orig: t("10.9.0.2:4000", "10.9.0.1:8000"),
            reply: t("172.17.0.2:8000", "10.9.0.2:4000"),
        };
        let plain = NatFlow {
            orig: t("172.17.0.1:5000", "172.17.0.2:80"),
            reply: t("172.17.0.2:80", "172.17.0.1:5000"),
        };
        let outbound = NatFlow {
            orig: t("172.17.0.2:5000", "1.1.1.1:443"),
            reply: t("1.1.1.1:443", "192.168.1.5:5000"),
        };
        assert!(f.wanted(&dnat));
        assert!(!f.wanted(&plain));
        assert!(!f.wanted(&outbound));
        let now = Instant::now();
        f.remember(dnat, now);
        assert!(f.by_reply.contains_key(&dnat.reply));
        f.expire(now + KEEP);
        assert!(f.by_reply.is_empty());
    }

    #[test]
    fn other_protocols_and_garbage_are_skipped() {
        let udp = nested(CTA_TUPLE_ORIG, &[nested(CTA_TUPLE_PROTO, &[attr(CTA_PROTO_NUM, &[17])])]);
        assert!(parse_destroy(&[&[2u8, 0, 0, 0][..], &udp].concat()).is_none());
        assert!(parse_destroy(&[1, 2]).is_none());
        assert!(parse_destroy(&[2, 0, 0, 0, 0xff, 0xff, 1]).is_none());
    }
}
