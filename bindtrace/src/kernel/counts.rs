//! The count maps' key lifecycle: how keys leave the kernel without losing a count.
//!
//! The hooks count every refusal in a preallocated per-CPU hash, `COUNTS_A` or `COUNTS_B`, the
//! one slot 0 of `GENERATION` names. A hook looks a key up and then writes through the pointer
//! it got; a deleted element goes back on the map's freelist and may be handed to another key
//! at once (kernel/bpf/hashtab.c), so a delete under a running hook could move an increment to
//! the wrong key. Userspace therefore deletes only where no hook can be:
//!
//! 1. **Idle keys** (the flip). Write the other generation, then wait one RCU grace period
//!    (`membarrier(MEMBARRIER_CMD_GLOBAL)` returns after one; BPF programs run inside an RCU
//!    read-side section, so every hook that read the old generation has returned). From then on
//!    the old map is userspace's alone: each key's per-CPU counts are read, added to
//!    [`Counts::drained`], and the key is deleted. The next flip drains the other map, so a key
//!    stays in the kernel only while it is refused; its count lives on in userspace.
//! 2. **Keys whose port left scope** (retire). The caller has deleted the port's `SCOPE` (and
//!    `TC_PORTS`) entry; after one grace period no hook is inside that port's refusal any more
//!    and none can start one, so its keys are read and deleted from both maps, even the active
//!    one.
//!
//! A key's total is always `drained + COUNTS_A + COUNTS_B`: a key moves from a map to
//! `drained` inside one call, with no hook writing it, so no count is ever seen twice or
//! missed. Where the kernel cannot wait for a grace period (membarrier without GLOBAL, as with
//! nohz_full CPUs), nothing is deleted: the maps then fill once and overflow is counted, as
//! before the lifecycle existed.
use std::collections::{HashMap, HashSet};

use aya::maps::{Array, MapData, MapError, PerCpuHashMap};
use bindtrace_common::{CountKey, CountValue, ScopeKey};

type CountMap = PerCpuHashMap<MapData, CountKey, CountValue>;

/// `membarrier(2)` commands.
const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

/// Waits for one RCU grace period, if this kernel lets us.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GracePeriod {
    available: bool,
}

impl GracePeriod {
    pub(crate) fn probe() -> GracePeriod {
        // SAFETY: membarrier takes two ints and a cpu id; QUERY only returns a bit mask.
        let mask = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0) };
        GracePeriod { available: mask >= 0 && mask & MEMBARRIER_CMD_GLOBAL as libc::c_long != 0 }
    }

    pub(crate) fn available(self) -> bool {
        self.available
    }

    /// Returns once every CPU has been through a quiescent state (with one CPU the kernel
    /// returns at once: no hook can be running while this thread is).
    fn wait(self) -> std::io::Result<()> {
        // SAFETY: as above; GLOBAL blocks in synchronize_rcu() and returns 0.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// What a flip or a retire moved out of the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    pub(crate) keys: usize,
    pub(crate) refusals: u64,
}

pub(crate) struct Counts {
    maps: [CountMap; 2],
    generation: Array<MapData, u32>,
    /// Index into `maps` of the map the hooks count into.
    active: usize,
    /// Counts of keys no longer in a kernel map, part of every total until forgotten.
    drained: HashMap<CountKey, u64>,
    grace: GracePeriod,
    /// Keys in the kernel maps when they were last walked (a flip or a full read).
    kernel_keys: usize,
    /// Whether the map the hooks left may still hold keys (not drained yet, or a delete failed
    /// while draining it). While it holds none, a key's total is one lookup, not two: at
    /// 100 000 new keys a second the lookups are most of the loop's syscalls.
    inactive_holds_keys: bool,
}

impl Counts {
    pub(crate) fn new(
        a: CountMap,
        b: CountMap,
        mut generation: Array<MapData, u32>,
    ) -> Result<Counts, MapError> {
        generation.set(0, 0, 0)?;
        Ok(Counts {
            maps: [a, b],
            generation,
            active: 0,
            drained: HashMap::new(),
            grace: GracePeriod::probe(),
            kernel_keys: 0,
            inactive_holds_keys: false,
        })
    }

    /// Whether keys can leave the kernel on this machine (see the module docs).
    pub(crate) fn lifecycle(&self) -> bool {
        self.grace.available()
    }

    fn in_map(map: &CountMap, key: &CountKey) -> Option<u64> {
        map.get(key, 0).ok().map(|v| v.iter().map(|c| c.count).sum())
    }

    /// The key's exact total since start (or since it was last forgotten).
    pub(crate) fn total(&self, key: &CountKey) -> u64 {
        let inactive = self.inactive_holds_keys.then(|| &self.maps[1 - self.active]);
        self.drained.get(key).copied().unwrap_or(0)
            + [Some(&self.maps[self.active]), inactive]
                .into_iter()
                .flatten()
                .filter_map(|m| Self::in_map(m, key))
                .sum::<u64>()
    }

    /// Whether a kernel map holds the key (a refusal since the last flip).
    pub(crate) fn in_kernel(&self, key: &CountKey) -> bool {
        self.maps.iter().any(|m| m.get(key, 0).is_ok())
    }

    /// Every key's exact total.
    pub(crate) fn totals(&mut self) -> HashMap<CountKey, u64> {
        let mut totals = self.drained.clone();
        let mut kernel_keys = 0;
        for map in &self.maps {
            for (key, values) in map.iter().filter_map(Result::ok) {
                kernel_keys += 1;
                *totals.entry(key).or_default() += values.iter().map(|c| c.count).sum::<u64>();
            }
        }
        self.kernel_keys = kernel_keys;
        totals
    }

    /// Keys in the kernel maps at the last walk (a gauge for the operator).
    pub(crate) fn kernel_keys(&self) -> usize {
        self.kernel_keys
    }

    /// Keys whose count only userspace holds.
    pub(crate) fn drained_keys(&self) -> usize {
        self.drained.len()
    }

    /// Makes the other map the active one and drains the one the hooks left (protocol step 1).
    pub(crate) fn flip(&mut self) -> std::io::Result<Moved> {
        if !self.grace.available() {
            return Ok(Moved::default());
        }
        let next = 1 - self.active;
        self.generation.set(0, next as u32, 0).map_err(std::io::Error::other)?;
        // The hooks count into `next` from now on, whether or not the wait below succeeds; the
        // old map holds its keys until it is drained, so totals read it too until then.
        let old = self.active;
        self.active = next;
        self.inactive_holds_keys = true;
        self.grace.wait()?;
        let keys: Vec<CountKey> = self.maps[old].keys().filter_map(Result::ok).collect();
        let moved = self.drain(old, keys);
        self.inactive_holds_keys = self.inactive_has_keys();
        self.kernel_keys = self.maps[next].keys().count();
        Ok(moved)
    }

    /// Drains every key of the ports in `gone` from both maps (protocol step 2). The caller
    /// removed their scope entries before calling.
    pub(crate) fn retire(&mut self, gone: &HashSet<ScopeKey>) -> std::io::Result<Moved> {
        if gone.is_empty() || !self.grace.available() {
            return Ok(Moved::default());
        }
        self.grace.wait()?;
        let mut moved = Moved::default();
        for m in 0..2 {
            let keys: Vec<CountKey> = self.maps[m]
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    gone.contains(&ScopeKey { netns_cookie: k.netns_cookie, ifindex: k.ifindex, _pad: 0 })
                })
                .collect();
            let part = self.drain(m, keys);
            moved.keys += part.keys;
            moved.refusals += part.refusals;
        }
        self.kernel_keys = self.kernel_keys.saturating_sub(moved.keys);
        self.inactive_holds_keys = self.inactive_has_keys();
        Ok(moved)
    }

    /// Whether the map the hooks do not count into holds any key (after a drain: only if a
    /// delete failed). One lookup, made after each flip or retire.
    fn inactive_has_keys(&self) -> bool {
        self.maps[1 - self.active].keys().next().is_some()
    }

    /// Moves `keys` of map `m` into `drained`. Only for keys no hook can be writing.
    fn drain(&mut self, m: usize, keys: Vec<CountKey>) -> Moved {
        let mut moved = Moved::default();
        for key in keys {
            let Some(count) = Self::in_map(&self.maps[m], &key) else { continue };
            // Counted before deleting: if the delete fails, the key stays and a later drain
            // moves it; the count is never in both places.
            match self.maps[m].remove(&key) {
                Ok(()) => {
                    *self.drained.entry(key).or_default() += count;
                    moved.keys += 1;
                    moved.refusals += count;
                }
                Err(e) => log::debug!("deleting a drained count key: {e}"),
            }
        }
        moved
    }

    /// Drops a key's userspace count: the caller has reported all of it, and no kernel map
    /// holds the key. If it is refused again it starts from zero, and so do its lines.
    pub(crate) fn forget(&mut self, key: &CountKey) {
        self.drained.remove(key);
    }

    /// Gives memory back after a large forget.
    pub(crate) fn shrink(&mut self) {
        self.drained.shrink_to_fit();
    }
}
