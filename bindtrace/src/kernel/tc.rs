//! The tc hook's attachments: one classifier link per port, on the host-side veth's ingress (what
//! leaves the container), kept in line with the scope by the same rescan that maintains `SCOPE`.
//! Ports whose refusals cross another namespace's interface (rootless Docker's veths in
//! RootlessKit's namespace, a rootless podman container's `lo`) are attached there, from a
//! thread that joined it, with the classifier copy of that namespace's slot ([`NsSlots`]).
//!
//! tcx links (Linux 6.6+) belong to a file descriptor: closing it detaches, even if bindtrace is
//! killed. Older kernels get a `clsact` qdisc and a direct-action cls_bpf filter, which outlives
//! the process unless removed: every link here is a [`SchedClassifierLink`], whose drop deletes
//! the filter, so a port that leaves, an error and a normal exit all detach. Only SIGKILL on a
//! kernel without tcx leaves filters behind: every filter is attached at the priority of this
//! instance's slot, and the next start removes what a dead instance left (see
//! [`super::tc_instance`]); in another namespace, before our first filter there. An empty `clsact` qdisc is left in place: other tools may be using
//! it, and it costs nothing without filters.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    io,
    sync::Arc,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
    },
};
use bindtrace_common::{LOOPBACK_IFINDEX, ScopeKey, TC_NS_SLOTS, TcPort, TcPortKey};

use crate::{
    kernel::{btf::Btf, tc_instance::Instance},
    netns::{Netns, scope::Port},
};

/// How the classifier is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachMode {
    /// A tcx link, first in the interface's ingress chain (kernels with `BPF_TCX_INGRESS`, 6.6+).
    Tcx,
    /// A cls_bpf filter under a `clsact` qdisc (every kernel bindtrace supports).
    Clsact,
}

impl AttachMode {
    /// From the kernel's BTF rather than its version: `enum bpf_attach_type` has
    /// `BPF_TCX_INGRESS` exactly when the kernel has tcx.
    pub(crate) fn detect(btf: &Btf) -> AttachMode {
        match btf.enum_value("bpf_attach_type", "BPF_TCX_INGRESS") {
            Ok(_) => AttachMode::Tcx,
            Err(_) => AttachMode::Clsact,
        }
    }

    /// `--tc-clsact` (hidden): the clsact path even where tcx exists, so that it can be tested
    /// on any kernel.
    pub(crate) fn choose(btf: &Btf, force_clsact: bool) -> AttachMode {
        if force_clsact { AttachMode::Clsact } else { AttachMode::detect(btf) }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "clsact",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AttachError {
    #[error(
        "attaching the tc classifier to {ifname} ({mode} ingress) failed: {source}. The tc hook \
         needs sched_cls programs and, before Linux 6.6, the clsact qdisc and cls_bpf filter \
         (modules sch_ingress and cls_bpf)"
    )]
    Attach {
        ifname: String,
        mode: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "{ifname} of netns {netns} is not watched: the tc hook attaches in at most {} network \
         namespaces besides bindtrace's own (one classifier copy each), and they are taken. It is \
         tried again as namespaces leave; on Linux 5.17+ the default hook (no --hook tc) watches \
         every namespace without attaching anything",
        TC_NS_SLOTS - 1
    )]
    NoSlot { ifname: String, netns: u64 },
    #[error("entering netns {netns} to attach the tc classifier to {ifname}: {source}")]
    Netns {
        ifname: String,
        netns: u64,
        #[source]
        source: io::Error,
    },
    #[error("loading the tc classifier {program} (for {ifname}): {source}")]
    Load {
        program: String,
        ifname: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// The namespace slots: which classifier copy (and `TC_PORTS` key prefix) each namespace other
/// than bindtrace's own gets. Slot 0 is ours and never handed out; a namespace keeps its slot
/// while anything of ours is attached in it.
#[derive(Debug)]
pub(crate) struct NsSlots {
    /// Namespace cookie -> slot.
    by_cookie: BTreeMap<u64, u32>,
    slots: u32,
}

impl NsSlots {
    pub(crate) fn new(slots: u32) -> NsSlots {
        NsSlots { by_cookie: BTreeMap::new(), slots }
    }

    /// The slot of the namespace `cookie`, and whether it was just handed out: the one it holds,
    /// else the lowest free one. None when all are taken.
    pub(crate) fn assign(&mut self, cookie: u64) -> Option<(u32, bool)> {
        if let Some(&slot) = self.by_cookie.get(&cookie) {
            return Some((slot, false));
        }
        let slot = (1..self.slots).find(|s| !self.by_cookie.values().any(|v| v == s))?;
        self.by_cookie.insert(cookie, slot);
        Some((slot, true))
    }

    /// Frees the slots of the namespaces for which `keep` is false.
    pub(crate) fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.by_cookie.retain(|&cookie, _| keep(cookie));
    }
}

/// Where a classifier goes: an interface of bindtrace's namespace (cookie 0) or of another one,
/// by that namespace's cookie and the ifindex there.
type Place = (u64, u32);

struct Wanted<'a> {
    /// None: bindtrace's own namespace.
    ns: Option<&'a Arc<Netns>>,
    ifname: &'a str,
    value: TcPort,
}

struct Attached {
    ifname: String,
    value: TcPort,
    slot: u32,
    /// The namespace it is attached in (held open), None for ours.
    ns: Option<Arc<Netns>>,
    /// Dropping it detaches (in the namespace of the thread that drops it, for a cls_bpf filter).
    link: SchedClassifierLink,
}

/// The `TC_PORTS` map and the link of every port the classifier is attached to, by where it is
/// attached.
pub(crate) struct TcPorts {
    mode: AttachMode,
    /// The name of the slot-0 classifier; slot N's is `NAME_N`.
    program: &'static str,
    map: HashMap<MapData, TcPortKey, TcPort>,
    attached: BTreeMap<Place, Attached>,
    slots: NsSlots,
    /// The cookie of bindtrace's own namespace (None if it could not be read).
    own_cookie: Option<u64>,
    /// The classifier copies loaded so far (slot 0 by the loader; the others on first use).
    loaded: BTreeSet<u32>,
    /// With clsact: the slot whose priority every filter gets. Declared last, so the lock is
    /// released only after `drop` has detached every filter.
    instance: Option<Instance>,
}

/// The name of the classifier copy for namespace slot `slot`.
pub(crate) fn copy_name(program: &str, slot: u32) -> String {
    if slot == 0 { program.to_owned() } else { format!("{program}_{slot}") }
}

impl TcPorts {
    /// `instance` is required with [`AttachMode::Clsact`] (and unused with tcx). `program`, the
    /// slot-0 classifier, is loaded already.
    pub(crate) fn new(
        mode: AttachMode,
        program: &'static str,
        map: HashMap<MapData, TcPortKey, TcPort>,
        instance: Option<Instance>,
    ) -> TcPorts {
        TcPorts {
            mode,
            program,
            map,
            attached: BTreeMap::new(),
            slots: NsSlots::new(TC_NS_SLOTS),
            own_cookie: Netns::own().ok().map(|n| n.cookie),
            loaded: BTreeSet::from([0]),
            instance,
        }
    }

    /// Attaches to ports that joined, detaches from ports that left, and updates the container
    /// side of ports whose peer moved (Docker moves it into the container after enslaving the
    /// host side). A port that vanishes while being attached is skipped: the next rescan sees it
    /// gone. Every other failure is returned, and the port stays unattached, so the next sync
    /// tries it again: a port bindtrace cannot watch must not pass silently, nor stop the others.
    ///
    /// Where a port's host side is: a veth of our namespace (slot 0); a rootless Docker
    /// container's veth peer in RootlessKit's namespace; a rootless podman container's own `lo`
    /// (the refusal crosses it). The latter two are attached from a thread inside that namespace,
    /// with the classifier copy of its slot.
    pub(crate) fn sync(&mut self, ebpf: &mut Ebpf, ports: &BTreeMap<ScopeKey, Port>) -> Vec<AttachError> {
        let mut failed = Vec::new();
        let mut wanted: BTreeMap<Place, Wanted<'_>> = BTreeMap::new();
        for p in ports.values() {
            let value = TcPort {
                netns_cookie: p.ns.cookie,
                netns_ino: p.ns.inode as u32,
                ifindex: p.ifindex,
                bridge: p.bridge,
                _pad: 0,
            };
            let (place, ns, ifname) = if p.on_loopback() {
                ((p.ns.cookie, LOOPBACK_IFINDEX), Some(&p.ns), "lo")
            } else if let Some((ns, ifindex)) = &p.host_elsewhere {
                ((ns.cookie, *ifindex), Some(ns), p.host_ifname.as_str())
            } else if p.in_other_namespace() {
                // RootlessKit's namespace could not be read this scan: nothing to attach to.
                continue;
            } else {
                ((0, p.host_ifindex), None, p.host_ifname.as_str())
            };
            // Another namespace that is ours after all (bindtrace run inside RootlessKit's): the
            // same interface as the scan of our own links may list, attached once, in slot 0.
            let (place, ns) = match ns {
                Some(n) if Some(n.cookie) == self.own_cookie => ((0, place.1), None),
                _ => (place, ns),
            };
            wanted.insert(place, Wanted { ns, ifname, value });
        }

        let gone: Vec<Place> = self.attached.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for place in gone {
            if let Some(a) = self.attached.remove(&place) {
                self.detach(place, a);
            }
        }
        // A namespace with nothing of ours attached any more gives its slot back.
        let attached = &self.attached;
        self.slots.retain(|cookie| attached.keys().any(|&(c, _)| c == cookie));

        for (&place, w) in &wanted {
            let (_, ifindex) = place;
            if let Some(a) = self.attached.get_mut(&place) {
                if a.value != w.value {
                    let key = TcPortKey { slot: a.slot, ifindex };
                    if let Err(e) = self.map.insert(key, w.value, 0) {
                        log::warn!("tc: updating {} in TC_PORTS: {e}", w.ifname);
                    }
                    a.value = w.value;
                }
                a.ifname = w.ifname.to_owned();
                continue;
            }
            let slot = match w.ns {
                None => 0,
                Some(ns) => match self.slots.assign(ns.cookie) {
                    Some((slot, fresh)) => {
                        if fresh {
                            log::debug!("tc: netns {} gets classifier slot {slot}", ns.inode);
                            self.remove_dead_filters_in(ns);
                        }
                        slot
                    }
                    None => {
                        failed.push(AttachError::NoSlot { ifname: w.ifname.to_owned(), netns: ns.inode });
                        continue;
                    }
                },
            };
            let name = copy_name(self.program, slot);
            let program = match self.program_copy(ebpf, slot, &name) {
                Ok(p) => p,
                Err(source) => {
                    failed.push(AttachError::Load {
                        program: name,
                        ifname: w.ifname.to_owned(),
                        source: Box::new(source),
                    });
                    continue;
                }
            };
            let key = TcPortKey { slot, ifindex };
            if let Err(e) = self.map.insert(key, w.value, 0) {
                log::warn!("tc: adding {} to TC_PORTS: {e}", w.ifname);
                continue;
            }
            let (mode, priority) = (self.mode, self.instance.as_ref().map_or(0, Instance::priority));
            let result = match w.ns {
                None => attach(mode, priority, program, ifindex, w.ifname),
                Some(ns) => ns.run(|| Ok(attach(mode, priority, program, ifindex, w.ifname))).unwrap_or_else(
                    |source| Err(AttachError::Netns { ifname: w.ifname.to_owned(), netns: ns.inode, source }),
                ),
            };
            let shown = match w.ns {
                None => w.ifname.to_owned(),
                Some(ns) => format!("{} of netns {}", w.ifname, ns.inode),
            };
            match result {
                Ok(Some(link)) => {
                    log::debug!("tc: attached {name} to {shown} ingress ({})", self.mode.name());
                    self.attached.insert(
                        place,
                        Attached {
                            ifname: w.ifname.to_owned(),
                            value: w.value,
                            slot,
                            ns: w.ns.cloned(),
                            link,
                        },
                    );
                }
                Ok(None) => {
                    log::debug!("tc: {shown} disappeared before it could be attached");
                    let _ = self.map.remove(&key);
                }
                Err(e) => {
                    let _ = self.map.remove(&key);
                    failed.push(e);
                }
            }
        }
        // Slots handed out for attachments that then failed.
        let attached = &self.attached;
        self.slots.retain(|cookie| attached.keys().any(|&(c, _)| c == cookie));
        failed
    }

    /// Ports the hook is attached to now.
    pub(crate) fn attached(&self) -> usize {
        self.attached.len()
    }

    /// The classifier copy of `slot`, loaded on first use (the verifier checks each copy).
    fn program_copy<'e>(
        &mut self,
        ebpf: &'e mut Ebpf,
        slot: u32,
        name: &str,
    ) -> Result<&'e mut SchedClassifier, aya::programs::ProgramError> {
        let program: &mut SchedClassifier =
            ebpf.program_mut(name).ok_or(aya::programs::ProgramError::UnexpectedProgramType)?.try_into()?;
        if self.loaded.insert(slot)
            && let Err(e) = program.load()
        {
            self.loaded.remove(&slot);
            return Err(e);
        }
        Ok(program)
    }

    /// With clsact, before the first filter in another namespace: what killed bindtraces left
    /// there (the loader did our own namespace at start).
    fn remove_dead_filters_in(&self, ns: &Netns) {
        let Some(instance) = &self.instance else { return };
        match instance.remove_dead_filters_in(self.program, ns) {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => log::info!(
                "tc: removed {} clsact filters that a killed bindtrace left in netns {}",
                removed.len(),
                ns.inode
            ),
            Err(e) => {
                log::warn!("tc: looking for filters a killed bindtrace left in netns {}: {e}", ns.inode)
            }
        }
    }

    fn detach(&mut self, place: Place, a: Attached) {
        use aya::programs::Link as _;
        let Attached { ifname, slot, ns, link, .. } = a;
        // A deleted veth took its filter or link with it; detaching then fails harmlessly.
        let result = match &ns {
            None => link.detach().map_err(|e| e.to_string()),
            // A cls_bpf filter is deleted by netlink, in the namespace it is in.
            Some(ns) => match ns.run(move || Ok(link.detach().map_err(|e| e.to_string()))) {
                Ok(r) => r,
                Err(e) => Err(format!("entering netns {}: {e}", ns.inode)),
            },
        };
        match result {
            Ok(()) => log::debug!("tc: detached from {ifname}"),
            Err(e) => log::debug!("tc: detaching from {ifname}: {e} (interface gone?)"),
        }
        let _ = self.map.remove(&TcPortKey { slot, ifindex: place.1 });
    }
}

impl Drop for TcPorts {
    fn drop(&mut self) {
        let all = std::mem::take(&mut self.attached);
        for (place, a) in all {
            self.detach(place, a);
        }
    }
}

/// Attaches `program` to `ifname` in the calling thread's namespace. Ok(None) when `ifname` no
/// longer names `ifindex` (deleted or renamed meanwhile).
fn attach(
    mode: AttachMode,
    priority: u16,
    program: &mut SchedClassifier,
    ifindex: u32,
    ifname: &str,
) -> Result<Option<SchedClassifierLink>, AttachError> {
    // aya attaches by name: make sure the name still means the interface the scan saw.
    if ifindex_of(ifname) != Some(ifindex) {
        return Ok(None);
    }
    let err = |source: aya::programs::ProgramError| AttachError::Attach {
        ifname: ifname.to_owned(),
        mode: mode.name(),
        source: Box::new(source),
    };
    let options = match mode {
        AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
        AttachMode::Clsact => {
            match tc::qdisc_add_clsact(ifname) {
                Ok(()) => log::debug!("tc: added a clsact qdisc to {ifname}"),
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) if ifindex_of(ifname) != Some(ifindex) => {
                    log::debug!("tc: adding clsact to {ifname}: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(err(e.into())),
            }
            // The slot's priority: what tells our filters from a dead instance's and others'.
            TcAttachOptions::Netlink(NlOptions { priority, ..NlOptions::default() })
        }
    };
    match program.attach_with_options(ifname, TcAttachType::Ingress, options) {
        Ok(id) => program.take_link(id).map(Some).map_err(err),
        Err(_) if ifindex_of(ifname) != Some(ifindex) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// `if_nametoindex` in the calling thread's namespace.
fn ifindex_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::btf::tests::{V5_10, V6_1, V6_18, fixture};

    #[test]
    fn a_namespace_keeps_its_slot_and_a_freed_slot_is_reused() {
        let mut slots = NsSlots::new(4);
        assert_eq!(slots.assign(100), Some((1, true)));
        assert_eq!(slots.assign(200), Some((2, true)));
        assert_eq!(slots.assign(100), Some((1, false)), "the slot it holds");
        assert_eq!(slots.assign(300), Some((3, true)));
        assert_eq!(slots.assign(400), None, "slot 0 is ours, 1..3 are taken");
        assert_eq!(slots.assign(300), Some((3, false)), "a full table still answers its members");
        slots.retain(|c| c != 200);
        assert_eq!(slots.assign(400), Some((2, true)), "the lowest freed slot");
        slots.retain(|_| false);
        assert_eq!(slots.assign(500), Some((1, true)));
    }

    #[test]
    fn every_slot_has_a_classifier_copy_name() {
        assert_eq!(copy_name("bt_tc", 0), "bt_tc");
        assert_eq!(copy_name("bt_tc", 7), "bt_tc_7");
        assert_eq!(TC_NS_SLOTS, 8, "bindtrace-ebpf's probes/tc.rs has one copy per slot");
    }

    #[test]
    fn tcx_comes_from_btf() {
        assert_eq!(AttachMode::detect(fixture(V6_18)), AttachMode::Tcx);
        assert_eq!(AttachMode::detect(fixture(V6_1)), AttachMode::Clsact);
        assert_eq!(AttachMode::detect(fixture(V5_10)), AttachMode::Clsact);
    }
}
