//! Who connects to a container, recorded as it happens.
//!
//! A refusal seen inside the container names only the SYN's source address, and both Docker's
//! userland proxy and any host process dialing the container IP come from the bridge's gateway
//! address. By the time userspace looks, the connecting socket is gone. So the connecting side
//! is recorded in the kernel, from `tcp:tcp_receive_reset`, when the reset reaches the
//! connecting socket in SYN_SENT: the 4-tuple is complete then, and the record goes to
//! `CONNECTORS` under that tuple and the refused namespace, where userspace finds it from the
//! refusal's own tuple and namespace. That tracepoint fires only for resets a socket receives,
//! so connections that succeed cost nothing here. Who the record names depends on where the
//! reset is processed (see `docs/attribution.md`):
//! - Usually in the connecting task itself. A veth queues the SYN on the sending CPU, and the
//!   softirq that refuses it runs when the sender re-enables bottom halves inside its own
//!   `connect()`; the reset comes back the same way, finds the socket locked by that
//!   `connect()` (`sk_lock.owned`), waits in its backlog and is processed by the owner at
//!   `release_sock`. So a reset in SYN_SENT with the socket owned is proof that the current task
//!   holds the socket: it is the connector (or a thread of it), on every architecture, with no
//!   ordering between CPUs to rely on. That costs nothing per connect.
//! - Otherwise in a softirq on behalf of nobody in particular: receive packet steering sent the
//!   SYN to another CPU, the backlog was deferred to ksoftirqd, or a non-blocking connect had
//!   returned before the reset came. The current task is then whoever was interrupted, and is
//!   not recorded; the refusal loses its `via` and is counted in `CONNECT_STATS`. Userspace
//!   then attaches `inet_sock_set_state` and turns parking on (`CONNECT_STATE`): from then on
//!   CLOSE -> SYN_SENT, which runs in the connecting task (`connect()`), parks the task under
//!   the socket's cookie when the destination is in a watched bridge's prefix, and SYN_SENT ->
//!   CLOSE after a reset in a softirq takes the parked record. That program runs on every TCP
//!   state change of the host, so it is attached only where it is needed.
//!
//! A refused flood is one connect after another to the same port, but userspace only ever asks
//! about the refusals it got a sample of (`refusal::emit`). The refusal hooks run before the
//! reset reaches the connecting socket, so they leave the sampled tuple in `CONNECT_WANTED`,
//! and SYN_SENT -> CLOSE writes `CONNECTORS` only for those.
//!
//! The tuple alone does not say which network a connection went to: rootless Docker reuses
//! 172.17.0.0/16 inside RootlessKit's namespace, and parallel namespaces reuse any prefix. The
//! connecting socket cannot tell either (it lives in the connector's namespace, and the route
//! that carried its SYN is not on it), but the refusal hook knows where the SYN was refused: it
//! leaves that namespace's identity (the same `netns_cookie` as the count and scope keys) as the
//! `CONNECT_WANTED` value, and `CONNECTORS` is keyed by it too. Two refusals of the same tuple
//! digest in two namespaces before either connector closes cannot both be told apart: the second
//! marks the digest [`WANTED_BY_SEVERAL`] and neither connector is recorded (their `via` is
//! missing, never another network's).
//!
//! Both run for every reset (and, parking, every TCP state change) on the host, so they keep to
//! plain loads through the BTF-typed `sk` (see `kernel::field`); only the IPv6 addresses and
//! `inet_sport` (beyond `struct sock`'s BTF type) are copied by helper, and only for a connect
//! that was refused.
//!
//! Struct offsets come from BTF through the loader, like everything in `kernel.rs`.
use aya_ebpf::{
    Global,
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use bindtrace_common::{
    AF_INET, AF_INET6, Addr16, CONNECT_DESTS_MAX_ENTRIES, CONNECT_MAX_ENTRIES, CONNECT_PARKED_MAX_ENTRIES,
    CONNECT_STAT_FROM_PARKED, CONNECT_STAT_SLOTS, CONNECT_STAT_UNATTRIBUTED, CONNECT_STATE_PARKING,
    CONNECT_STATE_SIGNALLED, CONNECT_STATE_SLOTS, CONNECT_WANTED_MAX_ENTRIES, ConnectKey, Connector,
    TCP_SYN_SENT, UDP_CONNECT_MAX_ENTRIES, mapped,
};

use crate::{
    kernel::{field, read},
    refusal::{bump, signal_unattributed},
};

/// Address prefixes of the watched bridges (IPv4 stored IPv4-mapped). Kept by userspace.
#[map]
static CONNECT_DESTS: LpmTrie<Addr16, u32> = LpmTrie::with_max_entries(CONNECT_DESTS_MAX_ENTRIES, 0);

/// Connects in flight to a watched prefix, by their socket's cookie, while parking is on. A
/// hash map: its update publishes the element only once the value is written, so a reader on
/// another CPU finds a complete record on any architecture. Full (that many connects in flight
/// at once) means the next ones go unparked.
#[map]
static CONNECT_PARKED: HashMap<u64, Connector> = HashMap::with_max_entries(CONNECT_PARKED_MAX_ENTRIES, 0);

/// [`CONNECT_STATE_PARKING`]: 1 once userspace attached the parking program (never cleared);
/// [`CONNECT_STATE_SIGNALLED`]: 1 once this side asked for it.
#[map]
static CONNECT_STATE: Array<u64> = Array::with_max_entries(CONNECT_STATE_SLOTS, 0);

/// Per-CPU counts of wanted refused connects: with no owner and nothing parked, and from a
/// parked record.
#[map]
static CONNECT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CONNECT_STAT_SLOTS, 0);

#[inline(always)]
fn state(slot: u32) -> u64 {
    CONNECT_STATE.get_ptr(slot).map_or(0, |p| unsafe { core::ptr::read_volatile(p) })
}

/// The socket's cookie: unique for the kernel's lifetime, and a number (the verifier allows no
/// arithmetic on the socket pointer itself).
#[inline(always)]
fn cookie_of(sk: u64) -> u64 {
    // SAFETY: `sk` is the tracepoint's BTF-typed socket, the argument this helper takes.
    unsafe { bpf_get_socket_cookie(sk as *mut c_void) }
}

/// Refused connects whose connector is known, by 4-tuple. Read by userspace.
#[map]
static CONNECTORS: LruHashMap<ConnectKey, Connector> = LruHashMap::with_max_entries(CONNECT_MAX_ENTRIES, 0);

/// Tuples of sampled refusals whose connector userspace will look up, as [`want_key`]s, with
/// the namespace each was refused in (or [`WANTED_BY_SEVERAL`]).
#[map]
static CONNECT_WANTED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(CONNECT_WANTED_MAX_ENTRIES, 0);

/// A `CONNECT_WANTED` value: refusals in more than one namespace want this digest, so whichever
/// connector closes first could belong to any of them, and none is recorded. Never a namespace
/// identity (cookies are counted up from 1; the inode numbers that stand in for them are 32-bit).
const WANTED_BY_SEVERAL: u64 = u64::MAX;

/// An 8-byte digest of a 4-tuple: both ports, and the addresses folded to 32 bits. Small so the
/// refusal hooks (the tc one is close to the 512-byte stack limit) can afford it. Two tuples
/// may share a digest: that only means one connector recorded that nobody asks for.
#[inline(always)]
fn want_key(client: u32, client_port: u16, target: u32, target_port: u16) -> u64 {
    (u64::from(client ^ target.rotate_left(16)) << 32)
        | (u64::from(client_port) << 16)
        | u64::from(target_port)
}

/// An address folded to 32 bits, the same for an IPv4 address and its IPv4-mapped IPv6 form
/// (an IPv6 socket dialing `::ffff:a.b.c.d` sends an IPv4 SYN).
#[inline(always)]
fn fold_v4(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a) ^ u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[inline(always)]
fn fold_v6(a: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    w(0) ^ w(4) ^ w(8) ^ w(12)
}

/// Called by the refusal hooks for each sample they send: the connector of this tuple, refused in
/// the namespace `refused_netns` (the refusal's own `netns_cookie`), is wanted.
#[inline(always)]
pub fn want(
    refused_netns: u64,
    family: u8,
    client: &[u8; 16],
    client_port: u16,
    target: &[u8; 16],
    target_port: u16,
) {
    let (c, t) = if family == AF_INET {
        (
            fold_v4([client[0], client[1], client[2], client[3]]),
            fold_v4([target[0], target[1], target[2], target[3]]),
        )
    } else {
        (fold_v6(client), fold_v6(target))
    };
    let key = want_key(c, client_port, t, target_port);
    // Atomic against another CPU's insert: of two refusals at once, one finds the other's.
    if CONNECT_WANTED.insert(&key, &refused_netns, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    match unsafe { CONNECT_WANTED.get(&key) }.copied() {
        // The same namespace again (a retry, another sample), or already ambiguous.
        Some(v) if v == refused_netns || v == WANTED_BY_SEVERAL => {}
        Some(_) => {
            let _ = CONNECT_WANTED.insert(&key, &WANTED_BY_SEVERAL, 0);
        }
        // Taken by its connector in between.
        None => {
            let _ = CONNECT_WANTED.insert(&key, &refused_netns, 0);
        }
    }
}

// `struct sock` / `struct inet_sock` offsets, from BTF.
#[unsafe(no_mangle)]
static OFF_SK_FAMILY: Global<u32> = Global::new(0);
/// `sock.__sk_common.skc_state` (one byte).
#[unsafe(no_mangle)]
static OFF_SK_STATE: Global<u32> = Global::new(0);
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
/// `sock.sk_lock.owned`: set while a task holds the socket (`lock_sock`).
#[unsafe(no_mangle)]
static OFF_SK_LOCK_OWNED: Global<u32> = Global::new(0);
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
        let v4: [u8; 4] = field::<u32>(sk, OFF_SK_DADDR.load()).to_ne_bytes();
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&v4);
        Some(mapped(AF_INET, &a))
    } else if family == AF_INET6 as u16 && CONNECT_V6.load() == 1 {
        read(sk + OFF_SK_V6_DADDR.load() as u64)
    } else {
        None
    }
}

/// The current task, as the connector of `sk` (its namespace is the socket's).
#[inline(always)]
fn current_connector(sk: u64) -> Connector {
    let pid_tgid = bpf_get_current_pid_tgid();
    let net: u64 = field(sk, OFF_SK_NET.load());
    // Every field set here (no `..Default::default()`: that is a memset call).
    Connector {
        netns_cookie: if net != 0 { field(net, OFF_CONN_NET_COOKIE.load()) } else { 0 },
        netns_ino: if net != 0 { field(net, OFF_CONN_NET_NS_INUM.load()) } else { 0 },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// CLOSE -> SYN_SENT, in the connecting task: parked only once parking is on.
#[inline(always)]
pub fn started(sk: u64) {
    if sk == 0 || state(CONNECT_STATE_PARKING) == 0 {
        return;
    }
    let family: u16 = field(sk, OFF_SK_FAMILY.load());
    let Some(dst) = daddr(sk, family) else { return };
    if CONNECT_DESTS.get(Key::new(128, dst)).is_none() {
        return;
    }
    let who = current_connector(sk);
    let _ = CONNECT_PARKED.insert(&cookie_of(sk), &who, BPF_ANY as u64);
}

/// The parked record of `sk`, taken out, when parking is on.
#[inline(always)]
fn take_parked(sk: u64) -> Option<Connector> {
    if state(CONNECT_STATE_PARKING) == 0 {
        return None;
    }
    let cookie = cookie_of(sk);
    let who = unsafe { CONNECT_PARKED.get(&cookie) }.copied()?;
    let _ = CONNECT_PARKED.remove(&cookie);
    Some(who)
}

/// A refused connect's 4-tuple, from its socket, and the namespace its refusal wants it for
/// (the `CONNECT_WANTED` entry, still in place).
struct Refused {
    key: ConnectKey,
    wanted: u64,
}

#[inline(always)]
fn refused(sk: u64) -> Option<Refused> {
    let family: u16 = field(sk, OFF_SK_FAMILY.load());
    let target_addr = daddr(sk, family)?;
    let client_addr = if family == AF_INET as u16 {
        let v4: [u8; 4] = field::<u32>(sk, OFF_SK_RCV_SADDR.load()).to_ne_bytes();
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&v4);
        mapped(AF_INET, &a)
    } else {
        read::<[u8; 16]>(sk + OFF_SK_V6_RCV_SADDR.load() as u64)?
    };
    // Both ports are big-endian on the socket. (skc_num would be host order, but closing
    // releases the port and zeroes it; inet_sport keeps it.)
    let sport = read::<u16>(sk + OFF_INET_SPORT.load() as u64)?;
    let dport: u16 = field(sk, OFF_SK_DPORT.load());
    let (client_port, target_port) = (u16::from_be(sport), u16::from_be(dport));
    let wanted = want_key(fold_v6(&client_addr), client_port, fold_v6(&target_addr), target_port);
    let refused_netns = unsafe { CONNECT_WANTED.get(&wanted) }.copied()?;
    let key = ConnectKey {
        refused_netns_cookie: refused_netns,
        client_addr,
        target_addr,
        client_port,
        target_port,
        _pad: 0,
    };
    Some(Refused { key, wanted })
}

/// Records `who` for a wanted refused connect, and drops the want. Whether a connector was
/// recorded.
#[inline(always)]
fn record(r: &Refused, who: Option<&Connector>) -> bool {
    let _ = CONNECT_WANTED.remove(&r.wanted);
    match who {
        // Refusals in several namespaces wanted this digest: none is recorded.
        _ if r.key.refused_netns_cookie == WANTED_BY_SEVERAL => false,
        Some(who) => {
            let _ = CONNECTORS.insert(&r.key, who, 0);
            true
        }
        None => {
            bump(&CONNECT_STATS, CONNECT_STAT_UNATTRIBUTED);
            false
        }
    }
}

/// Whether the current task holds `sk` (`lock_sock`): it is then processing the socket's
/// backlog at `release_sock`, and is the connector. Not owned: a softirq, whose current task is
/// unrelated.
#[inline(always)]
fn owned(sk: u64) -> bool {
    field::<u32>(sk, OFF_SK_LOCK_OWNED.load()) != 0
}

/// A reset reached `sk` (`tcp:tcp_receive_reset`, before the socket moves to CLOSE).
#[inline(always)]
pub fn reset(sk: u64) {
    if sk == 0 || u32::from(field::<u8>(sk, OFF_SK_STATE.load())) != TCP_SYN_SENT {
        return;
    }
    let Some(r) = refused(sk) else { return };
    if owned(sk) {
        record(&r, Some(&current_connector(sk)));
    } else if state(CONNECT_STATE_PARKING) == 0 {
        record(&r, None);
        // Two CPUs may both see 0 and signal: harmless, userspace attaches once.
        if state(CONNECT_STATE_SIGNALLED) == 0 {
            if let Some(p) = CONNECT_STATE.get_ptr_mut(CONNECT_STATE_SIGNALLED) {
                unsafe { core::ptr::write_volatile(p, 1) };
            }
            signal_unattributed();
        }
    }
    // Parking: SYN_SENT -> CLOSE, right after this, takes the parked record (`closed`).
}

/// SYN_SENT -> CLOSE while parking: the parked record is taken out either way; for a reset
/// processed in a softirq (left by `reset`) it names the connector.
#[inline(always)]
pub fn closed(sk: u64) {
    if sk == 0 {
        return;
    }
    let parked = take_parked(sk);
    if owned(sk) {
        return;
    }
    let Some(r) = refused(sk) else { return };
    if record(&r, parked.as_ref()) {
        bump(&CONNECT_STATS, CONNECT_STAT_FROM_PARKED);
    }
}

/// SYN_SENT -> ESTABLISHED: the connect succeeded, nothing to attribute; free its parking.
#[inline(always)]
pub fn established(sk: u64) {
    if sk != 0 && state(CONNECT_STATE_PARKING) != 0 {
        let _ = CONNECT_PARKED.remove(&cookie_of(sk));
    }
}

/// Connected UDP sockets to a watched prefix, by their 4-tuple after `connect()`. Read by
/// userspace for a refused datagram: docker-proxy's per-client socket is often closed by then.
#[map]
static UDP_CONNECTORS: LruHashMap<ConnectKey, Connector> =
    LruHashMap::with_max_entries(UDP_CONNECT_MAX_ENTRIES, 0);

/// A UDP (or other datagram) socket's `connect()` returned 0: record who made it when the
/// destination is in a watched prefix. `v4` for `__ip4_datagram_connect`, which sets the IPv4
/// fields even on an IPv6 socket dialing an IPv4-mapped address; `__ip6_datagram_connect`
/// leaves that case to it (it calls it), so each connect is recorded once.
#[inline(always)]
pub fn udp_connected(sk: u64, v4: bool) {
    if sk == 0 {
        return;
    }
    let (client_addr, target_addr) = if v4 {
        let d: [u8; 4] = field::<u32>(sk, OFF_SK_DADDR.load()).to_ne_bytes();
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&d);
        let target = mapped(AF_INET, &a);
        if CONNECT_DESTS.get(Key::new(128, target)).is_none() {
            return;
        }
        let s: [u8; 4] = field::<u32>(sk, OFF_SK_RCV_SADDR.load()).to_ne_bytes();
        a[..4].copy_from_slice(&s);
        (mapped(AF_INET, &a), target)
    } else {
        let family: u16 = field(sk, OFF_SK_FAMILY.load());
        if family != AF_INET6 as u16 || CONNECT_V6.load() != 1 {
            return;
        }
        let Some(target) = read::<[u8; 16]>(sk + OFF_SK_V6_DADDR.load() as u64) else { return };
        // IPv4-mapped: recorded by the IPv4 half.
        if target[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
            return;
        }
        if CONNECT_DESTS.get(Key::new(128, target)).is_none() {
            return;
        }
        let Some(client) = read::<[u8; 16]>(sk + OFF_SK_V6_RCV_SADDR.load() as u64) else { return };
        (client, target)
    };
    let Some(sport) = read::<u16>(sk + OFF_INET_SPORT.load() as u64) else { return };
    let dport: u16 = field(sk, OFF_SK_DPORT.load());
    let pid_tgid = bpf_get_current_pid_tgid();
    let net: u64 = field(sk, OFF_SK_NET.load());
    let who = Connector {
        netns_cookie: if net != 0 { field(net, OFF_CONN_NET_COOKIE.load()) } else { 0 },
        netns_ino: if net != 0 { field(net, OFF_CONN_NET_NS_INUM.load()) } else { 0 },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        _pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // Recorded before any refusal, so no refused namespace to key by: 0, as userspace asks.
    let key = ConnectKey {
        refused_netns_cookie: 0,
        client_addr,
        target_addr,
        client_port: u16::from_be(sport),
        target_port: u16::from_be(dport),
        _pad: 0,
    };
    let _ = UDP_CONNECTORS.insert(&key, &who, 0);
}

/// A read from a socket returned ECONNREFUSED: the port unreachable a container answered a
/// connected UDP socket's datagram with has reached its owner, in the owner's task. Recorded
/// like a connect (the socket is still connected, its 4-tuple intact), for kernels where the
/// connect itself cannot be traced; an IPv6 socket connected to an IPv4-mapped address has its
/// IPv4 fields set too, so it is recorded by those. (A TCP socket's read refused the same way
/// lands here too, under a tuple only UDP lines are looked up by: never read.)
#[inline(always)]
pub fn udp_refused_read(sk: u64) {
    if sk == 0 {
        return;
    }
    let family: u16 = field(sk, OFF_SK_FAMILY.load());
    if family == AF_INET as u16 {
        udp_connected(sk, true);
    } else if family == AF_INET6 as u16 && CONNECT_V6.load() == 1 {
        let Some(target) = read::<[u8; 16]>(sk + OFF_SK_V6_DADDR.load() as u64) else { return };
        udp_connected(sk, target[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
    }
}
