//! What every hook does once it has a refused SYN: check scope, count exactly, and tell
//! userspace only what it does not know yet.
use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use aya_log_ebpf::debug;
use bindtrace_common::{
    BRIDGE_LOOPBACK, BridgeId, COUNTS_MAX_ENTRIES, CountKey, CountValue, EVENT_CONNECT_UNATTRIBUTED,
    EVENT_OVERFLOW, GENERATION_SLOTS, IPPROTO_TCP, OVERFLOW_SAMPLE_KEYS, RefusalEvent, SCOPE_MAX_ENTRIES,
    STAT_COUNT_OVERFLOW, STAT_RINGBUF_LOST, STAT_SLOTS, ScopeKey, is_loopback,
};

use crate::{kernel::Ingress, packet::Segment};

/// Container-side interfaces whose veth peer is a port of a selected bridge, and the `lo` of
/// namespaces whose forwarder dials their own address (`BRIDGE_LOOPBACK`). Kept by userspace.
#[map]
static SCOPE: HashMap<ScopeKey, BridgeId> = HashMap::with_max_entries(SCOPE_MAX_ENTRIES, 0);

/// Exact refusal counts, in two maps: the hooks count into the one `GENERATION` names, and
/// userspace drains the other. A hook may hold a pointer into a preallocated element until it
/// returns, and a deleted element is reused at once, so userspace deletes only from a map no
/// hook can be using: the inactive one, one RCU grace period after the flip, or keys whose scope
/// entry went one grace period ago (the protocol is in `bindtrace/src/kernel/counts.rs`). Sizes
/// are set by the loader (`--counts-size`). A full map never evicts: the refusal is then
/// counted in `STATS[STAT_COUNT_OVERFLOW]`.
#[map]
static COUNTS_A: PerCpuHashMap<CountKey, CountValue> = PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);
#[map]
static COUNTS_B: PerCpuHashMap<CountKey, CountValue> = PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);

/// Slot 0: 0 counts into `COUNTS_A`, 1 into `COUNTS_B`. Written by userspace only.
#[map]
static GENERATION: Array<u32> = Array::with_max_entries(GENERATION_SLOTS, 0);

/// When each overflowing key last sent a sample (`bpf_ktime_get_ns`): sampling only. An LRU
/// element may be recycled under a hook that still writes it; the worst case is one sample
/// more or less for some key, never a wrong count.
#[map]
static OVERFLOW_SAMPLES: LruHashMap<CountKey, u64> = LruHashMap::with_max_entries(OVERFLOW_SAMPLE_KEYS, 0);

/// Per-CPU counters of what could not be delivered as it happened.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Samples for userspace. Its size is set by the loader (`--ringbuf-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// At most one event per key per CPU within this many nanoseconds (the loader sets it from
/// `--fold-window`); the counts cover the rest.
#[unsafe(no_mangle)]
static FOLD_WINDOW_NS: Global<u64> = Global::new(1_000_000_000);

/// Adds one to `slot` of a per-CPU counter array (`STATS` here, the connect tracker's own).
#[inline(always)]
pub fn bump(counters: &PerCpuArray<u64>, slot: u32) {
    if let Some(v) = counters.get_ptr_mut(slot) {
        // Per-CPU slot, and the same program never nests on one CPU: no atomics needed.
        unsafe { *v += 1 };
    }
}

/// Scope check first: most resets on a busy host are not ours, and this is the cheap exit.
#[inline(always)]
pub fn in_scope(ingress: &Ingress) -> Option<BridgeId> {
    let key = ScopeKey { netns_cookie: ingress.netns_cookie, ifindex: ingress.ifindex, _pad: 0 };
    unsafe { SCOPE.get(&key) }.copied()
}

/// What counting one refusal decided.
enum Counted {
    /// Counted under its key; `true` when this CPU owes userspace a sample for it.
    Keyed(bool),
    /// The active map is full: counted in the overflow slot.
    Overflow,
}

/// Counts one refusal of `key` in `counts`, exactly.
#[inline(always)]
fn count_in(counts: &PerCpuHashMap<CountKey, CountValue>, key: &CountKey, now: u64) -> Counted {
    if let Some(value) = counts.get_ptr_mut(key) {
        let value = unsafe { &mut *value };
        value.count += 1;
        if now.wrapping_sub(value.last_event_ns) >= FOLD_WINDOW_NS.load() || value.count == 1 {
            value.last_event_ns = now;
            return Counted::Keyed(true);
        }
        return Counted::Keyed(false);
    }
    let first = CountValue { count: 1, last_event_ns: now };
    if counts.insert(key, &first, BPF_NOEXIST as u64).is_ok() {
        return Counted::Keyed(true);
    }
    // Either another CPU created the key an instant ago (then our slot exists now) or the map
    // is full.
    match counts.get_ptr_mut(key) {
        Some(value) => {
            let value = unsafe { &mut *value };
            value.count += 1;
            value.last_event_ns = now;
            Counted::Keyed(true)
        }
        None => Counted::Overflow,
    }
}

/// Whether an overflowing refusal of `key` gets a sample: at most one per key per fold window.
#[inline(always)]
fn overflow_sample_due(key: &CountKey, now: u64) -> bool {
    if let Some(last) = OVERFLOW_SAMPLES.get_ptr_mut(key) {
        let last = unsafe { &mut *last };
        if now.wrapping_sub(*last) < FOLD_WINDOW_NS.load() {
            return false;
        }
        *last = now;
        return true;
    }
    let _ = OVERFLOW_SAMPLES.insert(key, &now, 0);
    true
}

/// Counts the refusal and, when this CPU has not told userspace about the key within the fold
/// window, sends an event.
#[inline(always)]
pub fn record<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    hook: u8,
    ingress: &Ingress,
    bridge: BridgeId,
    seg: &Segment,
) {
    // On a forwarder's `lo` (see BRIDGE_LOOPBACK) a SYN to a loopback address is the app
    // talking to itself, not a forwarded connection.
    if bridge == BRIDGE_LOOPBACK && is_loopback(seg.family, &seg.daddr) {
        return;
    }
    let key = CountKey {
        netns_cookie: ingress.netns_cookie,
        ifindex: ingress.ifindex,
        port: seg.dport,
        family: seg.family,
        proto: seg.proto,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    let counted =
        if generation == 0 { count_in(&COUNTS_A, &key, now) } else { count_in(&COUNTS_B, &key, now) };
    let (send, flags) = match counted {
        Counted::Keyed(send) => (send, 0),
        Counted::Overflow => {
            // No log here: one line per refusal would flood the log. The slot is the report.
            bump(&STATS, STAT_COUNT_OVERFLOW);
            (overflow_sample_due(&key, now), EVENT_OVERFLOW)
        }
    };
    if send {
        // Off unless bindtrace runs with -v (the loader sets aya-log's level global).
        debug!(
            ctx,
            "bindtrace: sample for port {} in netns {} ifindex {}",
            seg.dport,
            ingress.netns_ino,
            ingress.ifindex
        );
        emit(now, hook, flags, ingress, bridge, seg);
        // The connect tracker follows TCP state changes only: a UDP sender never shows there.
        if seg.proto == IPPROTO_TCP {
            crate::connect::want(
                ingress.netns_cookie,
                seg.family,
                &seg.saddr,
                seg.sport,
                &seg.daddr,
                seg.dport,
            );
        }
    }
}

/// Tells userspace to turn the connect tracker's parking on ([`EVENT_CONNECT_UNATTRIBUTED`]).
/// A full ring drops the signal, not a sample: the count it stands for is in `CONNECT_STATS`,
/// which userspace also reads at its idle pass.
#[inline(always)]
pub fn signal_unattributed() {
    let Some(mut entry) = EVENTS.reserve::<RefusalEvent>(0) else { return };
    entry.write(RefusalEvent {
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        netns_cookie: 0,
        netns_ino: 0,
        ifindex: 0,
        bridge: 0,
        client_port: 0,
        target_port: 0,
        family: 0,
        proto: 0,
        hook: 0,
        flags: EVENT_CONNECT_UNATTRIBUTED,
        client_addr: [0; 16],
        target_addr: [0; 16],
        _pad1: 0,
    });
    entry.submit(0);
}

#[inline(always)]
fn emit(now: u64, hook: u8, flags: u8, ingress: &Ingress, bridge: BridgeId, seg: &Segment) {
    let Some(mut entry) = EVENTS.reserve::<RefusalEvent>(0) else {
        bump(&STATS, STAT_RINGBUF_LOST);
        return;
    };
    entry.write(RefusalEvent {
        ktime_ns: now,
        netns_cookie: ingress.netns_cookie,
        netns_ino: ingress.netns_ino,
        ifindex: ingress.ifindex,
        bridge,
        client_port: seg.sport,
        target_port: seg.dport,
        family: seg.family,
        proto: seg.proto,
        hook,
        flags,
        client_addr: seg.saddr,
        target_addr: seg.daddr,
        _pad1: 0,
    });
    entry.submit(0);
}
