//! The refused segment's addresses, ports and flags, read from the `sk_buff`'s headers.
use bindtrace_common::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::kernel::{checksum_failed, header_addrs, read};

pub struct Segment {
    pub family: u8,
    pub proto: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// The segment if it is a TCP connection attempt: SYN set, ACK and RST clear. Resets answering
/// late data or ACKs (a server restarted mid-connection) are not refusals and stop here.
#[inline(always)]
pub fn tcp_syn(skb: u64) -> Option<Segment> {
    let (ip, tcp) = header_addrs(skb)?;
    // One copy per header: ports at 0..4 and flags at 13 of TCP's; IPv4's fixed 20 bytes
    // (version, protocol at 9, addresses at 12 and 16), or IPv6's 40 (next header at 6,
    // addresses at 8 and 24).
    let th: [u8; 14] = read(tcp)?;
    if th[13] & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST) != TCP_FLAG_SYN {
        return None;
    }
    let mut seg = Segment {
        family: 0,
        proto: IPPROTO_TCP,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: u16::from_be_bytes([th[0], th[1]]),
        dport: u16::from_be_bytes([th[2], th[3]]),
    };
    let v4: [u8; 20] = read(ip)?;
    match v4[0] >> 4 {
        4 => {
            if v4[9] != IPPROTO_TCP {
                return None;
            }
            seg.family = AF_INET;
            seg.saddr[..4].copy_from_slice(&v4[12..16]);
            seg.daddr[..4].copy_from_slice(&v4[16..20]);
        }
        6 => {
            // Extension headers are not followed: a refused SYN practically never carries
            // any, and kfree_skb also frees UDP, which must not pass for TCP.
            if v4[6] != IPPROTO_TCP {
                return None;
            }
            let v6: [u8; 40] = read(ip)?;
            seg.family = AF_INET6;
            seg.saddr.copy_from_slice(&v6[8..24]);
            seg.daddr.copy_from_slice(&v6[24..40]);
        }
        _ => return None,
    }
    Some(seg)
}

/// Whether the packet's IP header says UDP: one small read, no scope lookup. The UDP-only
/// program (next to `tcp-send-reset`) sees every refused SYN too (they are freed with
/// NO_SOCKET as well), and this is what lets it leave those before looking up their scope.
#[inline(always)]
pub fn says_udp(skb: u64) -> bool {
    let Some((ip, _)) = header_addrs(skb) else { return false };
    // Version at 0; the protocol at 9 for IPv4, the next header at 6 for IPv6.
    let Some(h) = read::<[u8; 10]>(ip) else { return false };
    match h[0] >> 4 {
        4 => h[9] == IPPROTO_UDP,
        6 => h[6] == IPPROTO_UDP,
        _ => false,
    }
}

/// The datagram if it is UDP to a unicast address (UDP-Lite and others stop here). Broadcast and
/// multicast take the kernel's multicast delivery path and are never freed with NO_SOCKET; the
/// address test only keeps a limited broadcast or multicast from ever passing for a refusal.
#[inline(always)]
pub fn udp_datagram(skb: u64) -> Option<Segment> {
    let (ip, udp) = header_addrs(skb)?;
    let uh: [u8; 4] = read(udp)?;
    let mut seg = Segment {
        family: 0,
        proto: IPPROTO_UDP,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: u16::from_be_bytes([uh[0], uh[1]]),
        dport: u16::from_be_bytes([uh[2], uh[3]]),
    };
    let v4: [u8; 20] = read(ip)?;
    match v4[0] >> 4 {
        4 => {
            if v4[9] != IPPROTO_UDP || v4[16] >= 224 {
                return None;
            }
            seg.family = AF_INET;
            seg.saddr[..4].copy_from_slice(&v4[12..16]);
            seg.daddr[..4].copy_from_slice(&v4[16..20]);
        }
        6 => {
            // No extension headers, as for TCP above.
            if v4[6] != IPPROTO_UDP {
                return None;
            }
            let v6: [u8; 40] = read(ip)?;
            if v6[24] == 0xff || checksum_failed(skb) {
                return None;
            }
            seg.family = AF_INET6;
            seg.saddr.copy_from_slice(&v6[8..24]);
            seg.daddr.copy_from_slice(&v6[24..40]);
        }
        _ => return None,
    }
    Some(seg)
}
