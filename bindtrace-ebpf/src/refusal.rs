//! What every hook does once it has a refused SYN: check scope, count exactly, and tell
//! userspace only what it does not know yet.
use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use aya_log_ebpf::{debug, warn};
use bindtrace_common::{
    BridgeId, COUNTS_MAX_ENTRIES, CountKey, CountValue, RefusalEvent, SCOPE_MAX_ENTRIES, STAT_COUNT_OVERFLOW,
    STAT_RINGBUF_LOST, STAT_SLOTS, ScopeKey,
};

use crate::{kernel::Ingress, packet::Segment};

/// Container-side interfaces whose veth peer is a port of a selected bridge. Kept by userspace.
#[map]
static SCOPE: HashMap<ScopeKey, BridgeId> = HashMap::with_max_entries(SCOPE_MAX_ENTRIES, 0);

/// Exact refusal counts. Preallocated: an insert into a full map fails (it never evicts), and
/// the refusal is then counted in `STATS[STAT_COUNT_OVERFLOW]` instead.
#[map]
static COUNTS: PerCpuHashMap<CountKey, CountValue> = PerCpuHashMap::with_max_entries(COUNTS_MAX_ENTRIES, 0);

/// Per-CPU counters of what could not be delivered as it happened.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Samples for userspace. Its size is set by the loader (`--ringbuf-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// At most one event per key per CPU within this many nanoseconds (the loader sets it from
/// `--fold-window`); the counts in `COUNTS` cover the rest.
#[unsafe(no_mangle)]
static FOLD_WINDOW_NS: Global<u64> = Global::new(1_000_000_000);

#[inline(always)]
fn bump(slot: u32) {
    if let Some(v) = STATS.get_ptr_mut(slot) {
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
    let key = CountKey {
        netns_cookie: ingress.netns_cookie,
        ifindex: ingress.ifindex,
        port: seg.dport,
        family: seg.family,
        proto: seg.proto,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let send = match COUNTS.get_ptr_mut(&key) {
        Some(value) => unsafe {
            (*value).count += 1;
            if now.wrapping_sub((*value).last_event_ns) >= FOLD_WINDOW_NS.load() || (*value).count == 1 {
                (*value).last_event_ns = now;
                true
            } else {
                false
            }
        },
        None => {
            let first = CountValue { count: 1, last_event_ns: now };
            if COUNTS.insert(&key, &first, BPF_NOEXIST as u64).is_err() {
                // Either another CPU created the key an instant ago (then our slot exists now)
                // or the map is full (then the overflow slot takes the count).
                match COUNTS.get_ptr_mut(&key) {
                    Some(value) => unsafe {
                        (*value).count += 1;
                        (*value).last_event_ns = now;
                    },
                    None => {
                        bump(STAT_COUNT_OVERFLOW);
                        warn!(ctx, "bindtrace: COUNTS map full, refusal counted as overflow");
                    }
                }
            }
            true
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
        emit(now, hook, ingress, bridge, seg);
        crate::connect::want(seg.family, &seg.saddr, seg.sport, &seg.daddr, seg.dport);
    }
}

#[inline(always)]
fn emit(now: u64, hook: u8, ingress: &Ingress, bridge: BridgeId, seg: &Segment) {
    let Some(mut entry) = EVENTS.reserve::<RefusalEvent>(0) else {
        bump(STAT_RINGBUF_LOST);
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
        _pad0: 0,
        client_addr: seg.saddr,
        target_addr: seg.daddr,
        _pad1: 0,
    });
    entry.submit(0);
}
