//! Who connects to a container, recorded as it happens.
//!
//! A refusal seen inside the container names only the SYN's source address, and both Docker's
//! userland proxy and any host process dialing the container IP come from the bridge's gateway
//! address. By the time userspace looks, the connecting socket is gone. So the connecting side
//! is recorded in two steps, from `sock:inet_sock_set_state`:
//! - CLOSE -> SYN_SENT runs in the connecting task (`connect()`), so its pid and comm are the
//!   connector's. The destination is already set, the source port not yet (it is chosen right
//!   after the state change), so the task is parked under the socket's address, and only when
//!   the destination is in a watched bridge's prefix (one LPM lookup; everything else leaves).
//! - SYN_SENT -> CLOSE (the reset arrived, or the connect failed) has the full 4-tuple; the
//!   parked task moves to `CONNECTORS` under that tuple, where userspace finds it from the
//!   refusal's own tuple. Connections that succeed are simply dropped from the parking map.
//!
//! Struct offsets come from BTF through the loader, like everything in `kernel.rs`.
use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{LpmTrie, LruHashMap, lpm_trie::Key},
};
use bindtrace_common::{
    AF_INET, AF_INET6, Addr16, CONNECT_DESTS_MAX_ENTRIES, CONNECT_MAX_ENTRIES, ConnectKey, Connector, mapped,
};

use crate::kernel::read;

/// Address prefixes of the watched bridges (IPv4 stored IPv4-mapped). Kept by userspace.
#[map]
static CONNECT_DESTS: LpmTrie<Addr16, u32> = LpmTrie::with_max_entries(CONNECT_DESTS_MAX_ENTRIES, 0);

/// Connects in flight to a watched prefix, by socket address.
#[map]
static CONNECT_PENDING: LruHashMap<u64, Connector> = LruHashMap::with_max_entries(CONNECT_MAX_ENTRIES, 0);

/// Connects that ended in SYN_SENT -> CLOSE, by 4-tuple. Read by userspace.
#[map]
static CONNECTORS: LruHashMap<ConnectKey, Connector> = LruHashMap::with_max_entries(CONNECT_MAX_ENTRIES, 0);

// `struct sock` / `struct inet_sock` offsets, from BTF.
#[unsafe(no_mangle)]
static OFF_SK_FAMILY: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_RCV_SADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_DPORT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_V6_DADDR: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_SK_V6_RCV_SADDR: Global<u32> = Global::new(0);
/// `sock.__sk_common.skc_net.net`.
#[unsafe(no_mangle)]
static OFF_SK_NET: Global<u32> = Global::new(0);
/// `inet_sock.inet_sport` (an inet_sock starts with its sock, so the same pointer).
#[unsafe(no_mangle)]
static OFF_INET_SPORT: Global<u32> = Global::new(0);
/// `net.net_cookie` and `net.ns.inum` (the same values as `kernel.rs` uses).
#[unsafe(no_mangle)]
static OFF_CONN_NET_COOKIE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static OFF_CONN_NET_NS_INUM: Global<u32> = Global::new(0);
/// 1 when this kernel's `sock_common` has the IPv6 addresses (CONFIG_IPV6).
#[unsafe(no_mangle)]
static CONNECT_V6: Global<u32> = Global::new(0);

/// The socket's destination address, IPv4-mapped for IPv4.
#[inline(always)]
fn daddr(sk: u64, family: u16) -> Option<[u8; 16]> {
    if family == AF_INET as u16 {
        let v4: [u8; 4] = read(sk + OFF_SK_DADDR.load() as u64)?;
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&v4);
        Some(mapped(AF_INET, &a))
    } else if family == AF_INET6 as u16 && CONNECT_V6.load() == 1 {
        read(sk + OFF_SK_V6_DADDR.load() as u64)
    } else {
        None
    }
}

/// CLOSE -> SYN_SENT, in the connecting task.
#[inline(always)]
pub fn started(sk: u64) {
    if sk == 0 {
        return;
    }
    let Some(family) = read::<u16>(sk + OFF_SK_FAMILY.load() as u64) else { return };
    let Some(dst) = daddr(sk, family) else { return };
    if CONNECT_DESTS.get(Key::new(128, dst)).is_none() {
        return;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut who = Connector {
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(net) = read::<u64>(sk + OFF_SK_NET.load() as u64) {
        who.netns_cookie = read(net + OFF_CONN_NET_COOKIE.load() as u64).unwrap_or(0);
        who.netns_ino = read(net + OFF_CONN_NET_NS_INUM.load() as u64).unwrap_or(0);
    }
    let _ = CONNECT_PENDING.insert(&sk, &who, 0);
}

/// SYN_SENT -> CLOSE: the tuple is complete now.
#[inline(always)]
pub fn closed(sk: u64) {
    if sk == 0 {
        return;
    }
    let Some(who) = (unsafe { CONNECT_PENDING.get(&sk) }).copied() else { return };
    let _ = CONNECT_PENDING.remove(&sk);
    let Some(family) = read::<u16>(sk + OFF_SK_FAMILY.load() as u64) else { return };
    let Some(target_addr) = daddr(sk, family) else { return };
    let client_addr = if family == AF_INET as u16 {
        let Some(v4) = read::<[u8; 4]>(sk + OFF_SK_RCV_SADDR.load() as u64) else { return };
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&v4);
        mapped(AF_INET, &a)
    } else {
        let Some(a) = read::<[u8; 16]>(sk + OFF_SK_V6_RCV_SADDR.load() as u64) else { return };
        a
    };
    // Both ports are big-endian on the socket. (skc_num would be host order, but closing has
    // already released the port and zeroed it; inet_sport keeps it.)
    let Some(sport) = read::<u16>(sk + OFF_INET_SPORT.load() as u64) else { return };
    let Some(dport) = read::<u16>(sk + OFF_SK_DPORT.load() as u64) else { return };
    let key = ConnectKey {
        client_addr,
        target_addr,
        client_port: u16::from_be(sport),
        target_port: u16::from_be(dport),
        _pad: 0,
    };
    let _ = CONNECTORS.insert(&key, &who, 0);
}
