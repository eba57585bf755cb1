//! Structs shared by bindtrace's eBPF programs and its userspace loader.
//!
//! Every struct is `#[repr(C)]`, ordered largest field first and padded explicitly so that the
//! kernel and userspace agree on the layout byte for byte (no hidden padding, no `bool`).
#![no_std]

/// Which kernel hook saw a refusal. Fixed values: they travel in events.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// `tp_btf/tcp_send_reset` with reason NO_SOCKET (kernels from about 6.10).
    TcpSendReset = 1,
    /// `tp_btf/kfree_skb` with drop reason NO_SOCKET (kernels from 5.17).
    KfreeSkb = 2,
    /// A tc classifier on each port's host-side veth, seeing the RST|ACK leave the container
    /// (any kernel with BTF; the fallback before 5.17).
    Tc = 3,
}

impl HookKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::TcpSendReset),
            2 => Some(Self::KfreeSkb),
            3 => Some(Self::Tc),
            _ => None,
        }
    }
}

/// Address families as the kernel numbers them.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// IP protocol numbers.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An interface in scope: the container-side end of a veth whose peer is a port of a selected
/// bridge. Keyed by namespace cookie (never reused, unlike inode numbers) and ifindex (only unique
/// within one namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeKey {
    pub netns_cookie: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

/// What the scope map stores for an interface: the index of its bridge in userspace's table.
pub type BridgeId = u32;

/// The scope value of a namespace's `lo` where a forwarder inside the namespace dials the
/// namespace's own address (rootless podman's rootlessport): the kernel cannot tell the
/// forwarder's SYN from the app's own, so on such an entry only refusals whose destination is
/// not a loopback address count (the forwarder never dials 127.0.0.0/8 or ::1).
pub const BRIDGE_LOOPBACK: BridgeId = u32::MAX;

/// The loopback device's ifindex, the same in every network namespace (the kernel registers it
/// first: `LOOPBACK_IFINDEX` in include/net/flow.h).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Whether `addr` (network byte order, IPv4 in the first 4 bytes) is a loopback address:
/// 127.0.0.0/8, ::1, or IPv4-mapped 127.0.0.0/8.
#[inline(always)]
pub fn is_loopback(family: u8, addr: &[u8; 16]) -> bool {
    if family == AF_INET {
        return addr[0] == 127;
    }
    let mut zero = true;
    let mut i = 0;
    while i < 10 {
        zero &= addr[i] == 0;
        i += 1;
    }
    if !zero {
        return false;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        return addr[12] == 127;
    }
    addr[10] | addr[11] | addr[12] | addr[13] | addr[14] == 0 && addr[15] == 1
}

/// The kernel's exact count of refusals is kept per CPU under this key. Client addresses and
/// ephemeral ports are deliberately absent: they would make the map unbounded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub netns_cookie: u64,
    pub ifindex: u32,
    /// Destination port of the refused SYN, host byte order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
}

/// Per-CPU value under a [`CountKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountValue {
    /// Refusals seen on this CPU, exact.
    pub count: u64,
    /// `bpf_ktime_get_ns` of the last event this CPU sent for the key; throttles the ring buffer.
    pub last_event_ns: u64,
}

/// Slots of the per-CPU `STATS` array.
pub const STAT_RINGBUF_LOST: u32 = 0;
/// Refusals that could not get their own key because the active count map was full (counted,
/// not lost: they are part of every total).
pub const STAT_COUNT_OVERFLOW: u32 = 1;
pub const STAT_SLOTS: u32 = 2;

/// Default capacity of each of the two count maps (`COUNTS_A`, `COUNTS_B`): (namespace,
/// interface, port, family, proto) keys. The loader sets the real size (`--counts-size`).
pub const COUNTS_MAX_ENTRIES: u32 = 16_384;
/// Capacity of `OVERFLOW_SAMPLES`, the LRU map that rate-limits samples of refusals whose key
/// found the count map full (one per key per fold window). Used for sampling only, never for
/// counting, so an eviction costs at most an extra sample.
pub const OVERFLOW_SAMPLE_KEYS: u32 = 4_096;
/// Which count map the hooks count into: slot 0 of the `GENERATION` array holds 0 (`COUNTS_A`)
/// or 1 (`COUNTS_B`). Userspace flips it, waits an RCU grace period, and then owns the other map
/// alone (see `bindtrace/src/kernel/counts.rs`).
pub const GENERATION_SLOTS: u32 = 1;
/// Capacity of the `SCOPE` map: container-side interfaces on selected bridges.
pub const SCOPE_MAX_ENTRIES: u32 = 16_384;

/// A refused connection attempt, sent through the `EVENTS` ring buffer: at most one per key,
/// per CPU, per fold window. Everything else is only counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the kernel refused the SYN.
    pub ktime_ns: u64,
    pub netns_cookie: u64,
    /// Namespace inode, for display and for finding the namespace's files.
    pub netns_ino: u32,
    /// Ingress interface in that namespace (the container-side veth).
    pub ifindex: u32,
    pub bridge: BridgeId,
    /// Client (source of the SYN) and target (its destination) ports, host byte order.
    pub client_port: u16,
    pub target_port: u16,
    pub family: u8,
    pub proto: u8,
    /// A [`HookKind`] value.
    pub hook: u8,
    /// `EVENT_*` bits.
    pub flags: u8,
    /// Addresses in network byte order; IPv4 uses the first 4 bytes.
    pub client_addr: [u8; 16],
    pub target_addr: [u8; 16],
    pub _pad1: u32,
}

/// [`RefusalEvent::flags`]: the refusal found the count map full, so it has no count of its own
/// (it is in `STATS[STAT_COUNT_OVERFLOW]`).
pub const EVENT_OVERFLOW: u8 = 1;
/// [`RefusalEvent::flags`]: not a refusal but a signal from the connect tracker: a refused
/// connect's reset was processed outside its connecting task while parking is off, so userspace
/// should turn parking on. Every other field is zero.
pub const EVENT_CONNECT_UNATTRIBUTED: u8 = 2;

/// What the tc hook knows about a port, under its [`TcPortKey`] (the host-side veth, or a
/// namespace's `lo`, where the classifier is attached) in the `TC_PORTS` map: the container side
/// the RST left from, as the other hooks key it, and the bridge. Userspace fills it from the same scan that fills `SCOPE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcPort {
    pub netns_cookie: u64,
    pub netns_ino: u32,
    /// Container-side ifindex (the veth peer, in the container's namespace).
    pub ifindex: u32,
    pub bridge: BridgeId,
    pub _pad: u32,
}

/// The key of `TC_PORTS`: an interface, in the namespace that the classifier copy of `slot`
/// is attached in. Ifindexes are per namespace (every `lo` is 1), and a classifier on kernels
/// before 5.17 cannot ask for its namespace's cookie, so each namespace the tc hook attaches in
/// gets a copy of the program of its own (`bt_tc` for slot 0, bindtrace's own namespace;
/// `bt_tc_N` for the others), which puts its constant slot in the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TcPortKey {
    pub slot: u32,
    /// The ifindex in that namespace: the host-side veth, or the namespace's `lo`.
    pub ifindex: u32,
}

/// Copies of the classifier in the eBPF object: slot 0 for bindtrace's own namespace and
/// `TC_NS_SLOTS - 1` for the other namespaces the tc hook attaches in (RootlessKit's, rootless
/// podman containers'). The eBPF side's copies must match (`probes/tc.rs`).
pub const TC_NS_SLOTS: u32 = 8;

/// TCP states (include/net/tcp_states.h). These numbers are ABI: /proc/net/tcp's `st` column and
/// `sock:inet_sock_set_state` report them, and they have not changed since Linux 2.x.
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_CLOSE: u32 = 7;

/// Capacity of `CONNECTORS` (sampled refused connects, by 4-tuple), an LRU map: old entries
/// make room.
pub const CONNECT_MAX_ENTRIES: u32 = 8_192;
/// Capacity of the connect tracker's parking map (used once parking is on): connects to the
/// watched prefixes in flight at once.
pub const CONNECT_PARKED_MAX_ENTRIES: u32 = 4_096;
/// `CONNECT_STATE` slots: parking on (1) or off (0), set by userspace once the state-change
/// program that parks is attached.
pub const CONNECT_STATE_PARKING: u32 = 0;
/// `CONNECT_STATE` slot: 1 once the kernel side has asked userspace for parking (one signal
/// per run, not one per refusal: a burst of them would crowd the samples out of the ring).
pub const CONNECT_STATE_SIGNALLED: u32 = 1;
pub const CONNECT_STATE_SLOTS: u32 = 2;
/// `CONNECT_STATS` slots (per CPU): wanted closes in a softirq with nothing parked (their
/// refusal's `via` is not recorded), and wanted closes attributed from a parked record.
pub const CONNECT_STAT_UNATTRIBUTED: u32 = 0;
pub const CONNECT_STAT_FROM_PARKED: u32 = 1;
pub const CONNECT_STAT_SLOTS: u32 = 2;
/// Capacity of `CONNECT_DESTS`: address prefixes of the watched bridges.
pub const CONNECT_DESTS_MAX_ENTRIES: u32 = 1_024;
/// Sampled refusals whose connector is wanted (one per sample; samples are rate-limited).
pub const CONNECT_WANTED_MAX_ENTRIES: u32 = 4_096;
/// `ECONNREFUSED`, the errno a read of a connected UDP socket returns once a port unreachable
/// came back for it (ABI: asm-generic/errno.h, the same on every Linux architecture bindtrace
/// builds for).
pub const ECONNREFUSED: i32 = 111;
/// Capacity of `UDP_CONNECTORS`, an LRU map of UDP sockets connected to a watched prefix, by
/// 4-tuple: every such `connect()` is recorded (it comes before any refusal, so none can be
/// asked for; where fexit is refused, every read of such a socket that failed with
/// ECONNREFUSED instead), and docker-proxy makes one per client. 4,096 entries of 80 bytes (320 KiB); the
/// oldest make room, so a record lasts as long as 4,095 newer connects to the bridges.
pub const UDP_CONNECT_MAX_ENTRIES: u32 = 4_096;

/// Who started a TCP connection to a watched prefix, recorded in the connecting task's context
/// when its socket enters SYN_SENT.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connector {
    /// Network namespace of the connecting socket.
    pub netns_cookie: u64,
    pub netns_ino: u32,
    /// Process (thread group) and thread ids in the initial pid namespace.
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    /// The thread's `comm`, NUL-padded.
    pub comm: [u8; 16],
}

/// A refused connection's 4-tuple as the connecting socket saw it, and the namespace where it
/// was refused. IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type serves
/// both families; a dual-stack socket connecting to an IPv4 address gives the same key as an
/// IPv4 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectKey {
    /// The refused namespace's identity as the refusal hooks key it (`CountKey::netns_cookie`:
    /// the watched workload's namespace, not the connector's). Two networks may reuse the same
    /// addresses (rootless Docker's 172.17.0.0/16, parallel namespaces): the tuple alone would
    /// name one network's connector on the other's refusal.
    pub refused_netns_cookie: u64,
    pub client_addr: [u8; 16],
    pub target_addr: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    pub target_port: u16,
    pub _pad: u32,
}

/// An IPv6 (or IPv4-mapped) address as the data of an LPM-trie key.
pub type Addr16 = [u8; 16];

/// `addr` (network byte order, IPv4 in the first 4 bytes when `family` is AF_INET) as stored in
/// [`ConnectKey`] and `CONNECT_DESTS`: IPv4 becomes `::ffff:a.b.c.d`.
#[inline(always)]
pub fn mapped(family: u8, addr: &[u8; 16]) -> [u8; 16] {
    if family == AF_INET {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]]
    } else {
        *addr
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers and byte arrays with explicit padding: every bit
    // pattern is valid.
    unsafe impl aya::Pod for ScopeKey {}
    unsafe impl aya::Pod for CountKey {}
    unsafe impl aya::Pod for CountValue {}
    unsafe impl aya::Pod for RefusalEvent {}
    unsafe impl aya::Pod for Connector {}
    unsafe impl aya::Pod for ConnectKey {}
    unsafe impl aya::Pod for TcPort {}
    unsafe impl aya::Pod for TcPortKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ScopeKey>(), 16);
        assert_eq!(size_of::<CountKey>(), 16);
        assert_eq!(size_of::<CountValue>(), 16);
        assert_eq!(size_of::<RefusalEvent>(), 72);
        assert_eq!(size_of::<TcPort>(), 24);
        assert_eq!(size_of::<TcPortKey>(), 8);
        assert_eq!(size_of::<Connector>(), 40);
        assert_eq!(size_of::<ConnectKey>(), 48);
        // Every byte is a field: 8 + 16 + 16 + 2 + 2 + 4.
        assert_eq!(core::mem::offset_of!(ConnectKey, client_addr), 8);
        assert_eq!(core::mem::offset_of!(ConnectKey, _pad), 44);
    }

    #[test]
    fn loopback_addresses() {
        let v4 = |a: [u8; 4]| {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a);
            b
        };
        assert!(is_loopback(AF_INET, &v4([127, 0, 0, 1])));
        assert!(is_loopback(AF_INET, &v4([127, 9, 8, 7])));
        assert!(!is_loopback(AF_INET, &v4([10, 0, 2, 100])));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback(AF_INET6, &one));
        assert!(is_loopback(AF_INET6, &mapped(AF_INET, &v4([127, 0, 0, 1]))));
        assert!(!is_loopback(AF_INET6, &mapped(AF_INET, &v4([10, 0, 2, 100]))));
        assert!(!is_loopback(AF_INET6, &[0u8; 16]));
        let mut ula = [0u8; 16];
        ula[0] = 0xfd;
        ula[15] = 1;
        assert!(!is_loopback(AF_INET6, &ula));
    }

    #[test]
    fn ipv4_is_mapped() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[172, 17, 0, 2]);
        assert_eq!(mapped(AF_INET, &a)[10..], [0xff, 0xff, 172, 17, 0, 2]);
        assert_eq!(mapped(AF_INET6, &a), a);
    }
}
