//! `classifier` on the host-side veth of each port of a selected bridge, at its ingress: it sees
//! every packet that leaves a container through that port.
//!
//! Why this hook: kernels before 5.17 have no drop reasons and their `tcp_send_reset` does not
//! fire without a socket, so no tracepoint sees a refused SYN. The reset the container's kernel
//! answers with is visible on the wire, though: for a SYN that finds no socket,
//! `tcp_v4_send_reset`/`tcp_v6_send_reset` reply with RST|ACK, sequence number 0 and
//! ack = ISN + 1 (a segment without ACK is answered with `seq = 0`, `ack = seq + SYN + len`).
//! Resets from a socket (an abort, late data after a server died) carry the sequence number of
//! their connection and, answering an ACK, no ACK flag: they stop at the flag or sequence test.
//!
//! It runs for every packet leaving a container, so the fast path is a handful of loads from the
//! packet (protocol, IP protocol, TCP flags, sequence number) and no helper call; only a RST|ACK
//! with sequence 0 looks the port up and counts. The program never drops or changes a packet and
//! returns `TC_ACT_UNSPEC` (`TCX_NEXT`): the next filter or tcx program runs as if we were not
//! there (`TC_ACT_OK` would end the chain and skip them).
//!
//! UDP the same way: a datagram to a port without a socket is answered with an ICMP (ICMPv6)
//! port unreachable that quotes the datagram's IP and UDP headers, and the classifier reads the
//! refused datagram from that quote. The kernel rate-limits those replies (per peer and
//! globally), so a UDP count here is a lower bound, and userspace says "at least N".
//!
//! The key is the same as the other hooks': the loader maps the host-side ifindex to the
//! container side's (netns cookie, ifindex) and bridge. The RST's source is the container (the
//! target), its destination the client.
//!
//! Not every port's host side is in bindtrace's namespace: rootless Docker's veths are in
//! RootlessKit's, and a rootless podman container's refusals cross its own `lo` (ifindex 1, as in
//! every namespace). There is no `bpf_get_netns_cookie` for tc programs on the kernels this hook
//! serves, so the namespace comes from the program itself: [`TC_NS_SLOTS`] copies of the
//! classifier, each a thin wrapper with a constant slot around the same code, slot 0 attached in
//! bindtrace's namespace and the others handed out by userspace, one per other namespace.
//! `TC_PORTS` is keyed by (slot, ifindex). On a `lo` the port's bridge is `BRIDGE_LOOPBACK`, so
//! `refusal::record` counts only refusals whose target is not a loopback address (the
//! forwarder dials the container's own address); a packet crosses `lo` twice (egress, then
//! ingress after `loopback_xmit`), and only ingress is attached, as on the veths.
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use bindtrace_common::{
    AF_INET, AF_INET6, HookKind, IPPROTO_TCP, IPPROTO_UDP, SCOPE_MAX_ENTRIES, TC_NS_SLOTS, TcPort, TcPortKey,
};

use crate::{kernel::Ingress, packet::Segment, refusal};

/// (slot of the namespace, host-side veth or `lo` ifindex there) -> the container side. Kept by
/// userspace.
#[map]
static TC_PORTS: HashMap<TcPortKey, TcPort> = HashMap::with_max_entries(SCOPE_MAX_ENTRIES, 0);

const ETH_HLEN: usize = 14;
/// `skb->protocol` values, in network byte order as `__sk_buff.protocol` holds them.
const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const TCP_RST_ACK: u8 = 0x04 | 0x10;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// Type, code, checksum and 4 bytes (unused, or the MTU) before the quoted datagram, in ICMP
/// and ICMPv6 alike.
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// One classifier per namespace slot, all the same code (`try_tc`, inlined into each).
macro_rules! classifiers {
    ($($name:ident = $slot:literal),* $(,)?) => {
        $(
            #[classifier]
            pub fn $name(ctx: TcContext) -> i32 {
                let _ = try_tc(&ctx, $slot);
                TC_ACT_UNSPEC
            }
        )*
        const COPIES: u32 = [$($slot),*].len() as u32;
    };
}

classifiers!(
    bt_tc = 0,
    bt_tc_1 = 1,
    bt_tc_2 = 2,
    bt_tc_3 = 3,
    bt_tc_4 = 4,
    bt_tc_5 = 5,
    bt_tc_6 = 6,
    bt_tc_7 = 7
);
const _: () = assert!(COPIES == TC_NS_SLOTS, "one classifier copy per slot");

/// A pointer to `T` at `off` when the whole `T` lies within the packet's linear data.
#[inline(always)]
fn at<T>(start: usize, end: usize, off: usize) -> Option<*const T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn try_tc(ctx: &TcContext, slot: u32) -> Option<()> {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the program's run; the verifier turns these
    // field reads into loads from the sk_buff.
    let protocol = unsafe { (*skb).protocol };
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = ETH_HLEN;
    let seg = if protocol == ETH_P_IP_BE {
        // version/IHL at 0, protocol at 9
        let hdr: *const [u8; 20] = at(start, end, ip)?;
        let hdr = unsafe { &*hdr };
        let ihl = ((hdr[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        match hdr[9] {
            IPPROTO_TCP => reset_v4(start, end, ip, ip + ihl)?,
            IPPROTO_ICMP => port_unreachable_v4(start, end, ip + ihl)?,
            _ => return None,
        }
    } else if protocol == ETH_P_IPV6_BE {
        // A reset or an ICMPv6 error the kernel builds carries no extension headers.
        let next: *const u8 = at(start, end, ip + 6)?;
        match unsafe { *next } {
            IPPROTO_TCP => reset_v6(start, end, ip, ip + IPV6_HLEN)?,
            IPPROTO_ICMPV6 => port_unreachable_v6(start, end, ip + IPV6_HLEN)?,
            _ => return None,
        }
    } else {
        return None;
    };

    // A refusal leaving a container: the rest runs only for these.
    let key = TcPortKey { slot, ifindex: unsafe { (*skb).ifindex } };
    let port = unsafe { TC_PORTS.get(&key) }?;
    let ingress =
        Ingress { netns_cookie: port.netns_cookie, netns_ino: port.netns_ino, ifindex: port.ifindex };
    refusal::record(ctx, HookKind::Tc as u8, &ingress, port.bridge, &seg);
    Some(())
}

/// The refused SYN behind a socketless reset: RST|ACK with sequence number 0.
#[inline(always)]
fn reset_v4(start: usize, end: usize, ip: usize, tcp: usize) -> Option<Segment> {
    let th = reset_header(start, end, tcp)?;
    let hdr: *const [u8; 20] = at(start, end, ip)?;
    let hdr = unsafe { &*hdr };
    let mut seg = reset_segment(AF_INET, &th);
    // The RST goes from the target back to the client.
    seg.saddr[..4].copy_from_slice(&hdr[16..20]);
    seg.daddr[..4].copy_from_slice(&hdr[12..16]);
    Some(seg)
}

#[inline(always)]
fn reset_v6(start: usize, end: usize, ip: usize, tcp: usize) -> Option<Segment> {
    let th = reset_header(start, end, tcp)?;
    let hdr: *const [u8; IPV6_HLEN] = at(start, end, ip)?;
    let hdr = unsafe { &*hdr };
    let mut seg = reset_segment(AF_INET6, &th);
    seg.saddr.copy_from_slice(&hdr[24..40]);
    seg.daddr.copy_from_slice(&hdr[8..24]);
    Some(seg)
}

/// The TCP header's first bytes when it is a socketless reset (ports 0..4, seq 4..8, flags at 13).
#[inline(always)]
fn reset_header(start: usize, end: usize, tcp: usize) -> Option<[u8; TCP_HLEN]> {
    let th: *const [u8; TCP_HLEN] = at(start, end, tcp)?;
    let th = unsafe { *th };
    if th[13] != TCP_RST_ACK || th[4] | th[5] | th[6] | th[7] != 0 {
        return None;
    }
    Some(th)
}

#[inline(always)]
fn reset_segment(family: u8, th: &[u8; TCP_HLEN]) -> Segment {
    Segment {
        family,
        proto: IPPROTO_TCP,
        saddr: [0; 16],
        daddr: [0; 16],
        // The RST goes from the target back to the client: its ports are the SYN's swapped.
        sport: u16::from_be_bytes([th[2], th[3]]),
        dport: u16::from_be_bytes([th[0], th[1]]),
    }
}

/// The refused datagram inside an ICMP destination unreachable, code port unreachable: the
/// original IPv4 header (with its options) and the first 8 bytes of its UDP header, which the
/// kernel quotes as it received them. So the segment is the datagram's own: client to target.
///
/// `udp_rcv` sends this reply only after the checksum verified and only to a unicast datagram
/// (broadcast and multicast never get one; `icmp_send` refuses them too), and the ICMP rate
/// limits may suppress it: what this counts is a lower bound of the datagrams refused.
#[inline(always)]
fn port_unreachable_v4(start: usize, end: usize, icmp: usize) -> Option<Segment> {
    // type, code, checksum, 4 unused bytes, then the original datagram.
    let ih: *const [u8; 2] = at(start, end, icmp)?;
    let ih = unsafe { &*ih };
    if ih[0] != ICMP_DEST_UNREACH || ih[1] != ICMP_PORT_UNREACH {
        return None;
    }
    let inner = icmp + ICMP_HLEN;
    let hdr: *const [u8; 20] = at(start, end, inner)?;
    let hdr = unsafe { &*hdr };
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    // UDP only (an iptables REJECT inside the container may quote TCP); a multicast or
    // broadcast destination is never a refusal.
    if hdr[0] >> 4 != 4 || ihl < 20 || hdr[9] != IPPROTO_UDP || hdr[16] >= 224 {
        return None;
    }
    let uh: *const [u8; 4] = at(start, end, inner + ihl)?;
    let uh = unsafe { &*uh };
    let mut seg = udp_segment(AF_INET, uh);
    seg.saddr[..4].copy_from_slice(&hdr[12..16]);
    seg.daddr[..4].copy_from_slice(&hdr[16..20]);
    Some(seg)
}

/// The same for ICMPv6 destination unreachable, code port unreachable (`__udp6_lib_rcv` sends it
/// after the checksum verified, so a bad-checksum datagram never shows here). The quoted IPv6
/// header's extension headers are not followed, as for TCP.
#[inline(always)]
fn port_unreachable_v6(start: usize, end: usize, icmp: usize) -> Option<Segment> {
    let ih: *const [u8; 2] = at(start, end, icmp)?;
    let ih = unsafe { &*ih };
    if ih[0] != ICMPV6_DEST_UNREACH || ih[1] != ICMPV6_PORT_UNREACH {
        return None;
    }
    let inner = icmp + ICMP_HLEN;
    let hdr: *const [u8; IPV6_HLEN] = at(start, end, inner)?;
    let hdr = unsafe { &*hdr };
    if hdr[0] >> 4 != 6 || hdr[6] != IPPROTO_UDP || hdr[24] == 0xff {
        return None;
    }
    let uh: *const [u8; 4] = at(start, end, inner + IPV6_HLEN)?;
    let uh = unsafe { &*uh };
    let mut seg = udp_segment(AF_INET6, uh);
    seg.saddr.copy_from_slice(&hdr[8..24]);
    seg.daddr.copy_from_slice(&hdr[24..40]);
    Some(seg)
}

#[inline(always)]
fn udp_segment(family: u8, uh: &[u8; 4]) -> Segment {
    Segment {
        family,
        proto: IPPROTO_UDP,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: u16::from_be_bytes([uh[0], uh[1]]),
        dport: u16::from_be_bytes([uh[2], uh[3]]),
    }
}
