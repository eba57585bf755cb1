//! The refused segment's addresses, ports and flags, read from the `sk_buff`'s headers.
use bindtrace_common::{AF_INET, AF_INET6, IPPROTO_TCP};

use crate::kernel::{header_addrs, read};

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
    let flags: u8 = read(tcp + 13)?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST) != TCP_FLAG_SYN {
        return None;
    }
    let ports: [u8; 4] = read(tcp)?;
    let mut seg = Segment {
        family: 0,
        proto: IPPROTO_TCP,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
    };
    let version: u8 = read(ip)?;
    match version >> 4 {
        4 => {
            // protocol at 9, saddr at 12, daddr at 16
            let hdr: [u8; 20] = read(ip)?;
            if hdr[9] != IPPROTO_TCP {
                return None;
            }
            seg.family = AF_INET;
            seg.saddr[..4].copy_from_slice(&hdr[12..16]);
            seg.daddr[..4].copy_from_slice(&hdr[16..20]);
        }
        6 => {
            // Next header at 6. Extension headers are not followed: a refused SYN practically
            // never carries any, and kfree_skb also frees UDP, which must not pass for TCP.
            let next: u8 = read(ip + 6)?;
            if next != IPPROTO_TCP {
                return None;
            }
            seg.family = AF_INET6;
            seg.saddr = read(ip + 8)?;
            seg.daddr = read(ip + 24)?;
        }
        _ => return None,
    }
    Some(seg)
}
