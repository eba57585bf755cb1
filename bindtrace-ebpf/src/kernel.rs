//! Reads of kernel structs at offsets the loader resolved from the running kernel's BTF.
//!
//! aya has no CO-RE relocations for Rust programs, so every offset is a global the loader
//! overrides before load (like libbpf's `const volatile`). The defaults below are never used for
//! real: the loader refuses to start without resolved values.
use aya_ebpf::{Global, helpers::bpf_probe_read_kernel};

#[unsafe(no_mangle)]
static OFF_SKB_DEV: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_HEAD: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_NETWORK_HEADER: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_TRANSPORT_HEADER: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_DEV_IFINDEX: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_DEV_ND_NET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_NET_COOKIE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_NET_NS_INUM: Global<u32> = Global::new(0);

/// A copy through `bpf_probe_read_kernel`: for memory the verifier has no type for (packet
/// bytes behind `skb->head`, fields beyond a pointer's BTF type).
#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// A field of a struct the program holds a BTF-typed pointer to: a `tp_btf` argument, or a
/// pointer loaded by this function. The offset is a global in the frozen, read-only `.rodata`
/// map, so the verifier knows it as a constant, checks the access against the running kernel's
/// BTF, and emits a plain load guarded by the exception table instead of a helper call (each
/// `bpf_probe_read_kernel` costs tens of nanoseconds; these run for every refusal, and for
/// `kfree_skb` for every dropped packet). A pointer field that is NULL reads as 0.
#[inline(always)]
pub fn field<T: Copy>(base: u64, off: u32) -> T {
    // SAFETY: the verifier checks this load against BTF; a fault reads as zero.
    unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
}

/// Where a packet came in: its device's namespace and the device's index there.
pub struct Ingress {
    pub netns_cookie: u64,
    pub netns_ino: u32,
    pub ifindex: u32,
}

/// `skb->dev->ifindex` and `skb->dev->nd_net`'s cookie and inode. The device, not a socket:
/// a refused SYN has none, and `bpf_get_netns_cookie` would answer for the root namespace.
#[inline(always)]
pub fn ingress_of(skb: u64) -> Option<Ingress> {
    // The verifier types `skb` as a trusted-or-NULL sk_buff pointer and allows arithmetic on it
    // only after a NULL check.
    if skb == 0 {
        return None;
    }
    let dev: u64 = field(skb, OFF_SKB_DEV.load());
    if dev == 0 {
        return None;
    }
    let ifindex: u32 = field(dev, OFF_DEV_IFINDEX.load());
    let net: u64 = field(dev, OFF_DEV_ND_NET.load());
    if net == 0 {
        return None;
    }
    let netns_cookie: u64 = field(net, OFF_NET_COOKIE.load());
    let netns_ino: u32 = field(net, OFF_NET_NS_INUM.load());
    Some(Ingress { netns_cookie, netns_ino, ifindex })
}

/// Start of the network and transport headers of `skb` (`head` + the u16 offsets).
#[inline(always)]
pub fn header_addrs(skb: u64) -> Option<(u64, u64)> {
    if skb == 0 {
        return None;
    }
    // `head` points to bytes, which have no BTF type: it loads as a plain number.
    let head: u64 = field(skb, OFF_SKB_HEAD.load());
    let network: u16 = field(skb, OFF_SKB_NETWORK_HEADER.load());
    let transport: u16 = field(skb, OFF_SKB_TRANSPORT_HEADER.load());
    if head == 0 {
        return None;
    }
    // 0xffff means "not set" (skb_transport_header_was_set() is false).
    if network == u16::MAX || transport == u16::MAX {
        return None;
    }
    Some((head + network as u64, head + transport as u64))
}

/// `sk_buff.csum_complete_sw` and `sk_buff.csum_valid`: bitfields, so each is the byte that
/// holds it and the bit's position in that byte (the loader checks that each is one bit).
#[unsafe(no_mangle)]
static OFF_SKB_CSUM_COMPLETE_SW: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static BIT_SKB_CSUM_COMPLETE_SW: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SKB_CSUM_VALID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static BIT_SKB_CSUM_VALID: Global<u32> = Global::new(0);

/// Whether the kernel verified this packet's transport checksum in software and found it bad.
///
/// IPv6's `__udp6_lib_rcv` sets the drop reason to NO_SOCKET before it verifies the checksum of a
/// datagram no socket wants, and keeps that reason when the check fails; IPv4 checks first. That
/// check (`udp_lib_checksum_complete` -> `__skb_checksum_complete`) records its result in two bits:
/// `csum_complete_sw = 1` and `csum_valid = !bad`. A datagram whose checksum was already known to
/// be good (offloaded, or from a local sender with CHECKSUM_PARTIAL) never sets `csum_complete_sw`
/// here; one checked and good has `csum_valid`. Only the bad one has the first bit without the
/// second. Read with `bpf_probe_read_kernel`: this runs only for IPv6 UDP refusals.
#[inline(always)]
pub fn checksum_failed(skb: u64) -> bool {
    let bit = |off: u32, bit: u32| -> bool {
        read::<u8>(skb + off as u64).map(|b| (b >> (bit & 7)) & 1 == 1).unwrap_or(false)
    };
    bit(OFF_SKB_CSUM_COMPLETE_SW.load(), BIT_SKB_CSUM_COMPLETE_SW.load())
        && !bit(OFF_SKB_CSUM_VALID.load(), BIT_SKB_CSUM_VALID.load())
}
