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
//! The key is the same as the other hooks': the loader maps the host-side ifindex to the
//! container side's (netns cookie, ifindex) and bridge. The RST's source is the container (the
//! target), its destination the client.
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use bindtrace_common::{AF_INET, AF_INET6, HookKind, IPPROTO_TCP, SCOPE_MAX_ENTRIES, TcPort};

use crate::{kernel::Ingress, packet::Segment, refusal};

/// Host-side veth ifindex (bindtrace's namespace) -> the container side. Kept by userspace.
#[map]
static TC_PORTS: HashMap<u32, TcPort> = HashMap::with_max_entries(SCOPE_MAX_ENTRIES, 0);

const ETH_HLEN: usize = 14;
/// `skb->protocol` values, in network byte order as `__sk_buff.protocol` holds them.
const ETH_P_IP_BE: u32 = (0x0800u16).to_be() as u32;
const ETH_P_IPV6_BE: u32 = (0x86DDu16).to_be() as u32;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const TCP_RST_ACK: u8 = 0x04 | 0x10;

#[classifier]
pub fn bt_tc(ctx: TcContext) -> i32 {
    let _ = try_tc(&ctx);
    TC_ACT_UNSPEC
}

/// A pointer to `T` at `off` when the whole `T` lies within the packet's linear data.
#[inline(always)]
fn at<T>(start: usize, end: usize, off: usize) -> Option<*const T> {
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn try_tc(ctx: &TcContext) -> Option<()> {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the program's run; the verifier turns these
    // field reads into loads from the sk_buff.
    let protocol = unsafe { (*skb).protocol };
    let (start, end) = (ctx.data(), ctx.data_end());
    let (family, ip, tcp) = if protocol == ETH_P_IP_BE {
        let ip = ETH_HLEN;
        // version/IHL at 0, protocol at 9
        let hdr: *const [u8; 20] = at(start, end, ip)?;
        let hdr = unsafe { &*hdr };
        if hdr[9] != IPPROTO_TCP {
            return None;
        }
        let ihl = ((hdr[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        (AF_INET, ip, ip + ihl)
    } else if protocol == ETH_P_IPV6_BE {
        let ip = ETH_HLEN;
        // A reset the kernel builds carries no extension headers.
        let next: *const u8 = at(start, end, ip + 6)?;
        if unsafe { *next } != IPPROTO_TCP {
            return None;
        }
        (AF_INET6, ip, ip + IPV6_HLEN)
    } else {
        return None;
    };
    // ports 0..4, seq 4..8, flags at 13
    let th: *const [u8; TCP_HLEN] = at(start, end, tcp)?;
    let th = unsafe { &*th };
    if th[13] != TCP_RST_ACK || th[4] | th[5] | th[6] | th[7] != 0 {
        return None;
    }

    // A refusal leaving a container: the rest runs only for these.
    let host_ifindex = unsafe { (*skb).ifindex };
    let port = unsafe { TC_PORTS.get(&host_ifindex) }?;
    let mut seg = Segment {
        family,
        proto: IPPROTO_TCP,
        saddr: [0; 16],
        daddr: [0; 16],
        // The RST goes from the target back to the client.
        sport: u16::from_be_bytes([th[2], th[3]]),
        dport: u16::from_be_bytes([th[0], th[1]]),
    };
    if family == AF_INET {
        let hdr: *const [u8; 20] = at(start, end, ip)?;
        let hdr = unsafe { &*hdr };
        seg.saddr[..4].copy_from_slice(&hdr[16..20]);
        seg.daddr[..4].copy_from_slice(&hdr[12..16]);
    } else {
        let hdr: *const [u8; IPV6_HLEN] = at(start, end, ip)?;
        let hdr = unsafe { &*hdr };
        seg.saddr.copy_from_slice(&hdr[24..40]);
        seg.daddr.copy_from_slice(&hdr[8..24]);
    }
    let ingress =
        Ingress { netns_cookie: port.netns_cookie, netns_ino: port.netns_ino, ifindex: port.ifindex };
    refusal::record(ctx, HookKind::Tc as u8, &ingress, port.bridge, &seg);
    Some(())
}
