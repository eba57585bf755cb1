//! The tc hook's attachments: one classifier link per port, on the host-side veth's ingress (what
//! leaves the container), kept in line with the scope by the same rescan that maintains `SCOPE`.
//!
//! tcx links (Linux 6.6+) belong to a file descriptor: closing it detaches, even if bindtrace is
//! killed. Older kernels get a `clsact` qdisc and a direct-action cls_bpf filter, which outlives
//! the process unless removed: every link here is a [`SchedClassifierLink`], whose drop deletes
//! the filter, so a port that leaves, an error and a normal exit all detach. Only SIGKILL on a
//! kernel without tcx leaves filters behind: every filter is attached at the priority of this
//! instance's slot, and the next start removes what a dead instance left (see
//! [`super::tc_instance`]). An empty `clsact` qdisc is left in place: other tools may be using
//! it, and it costs nothing without filters.
use std::{collections::BTreeMap, ffi::CString};

use aya::{
    maps::{HashMap, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError},
    },
};
use bindtrace_common::{ScopeKey, TcPort};

use crate::{
    kernel::{btf::Btf, tc_instance::Instance},
    netns::scope::Port,
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
#[error(
    "attaching the tc classifier to {ifname} ({mode} ingress) failed: {source}. The tc hook needs \
     sched_cls programs and, before Linux 6.6, the clsact qdisc and cls_bpf filter (modules \
     sch_ingress and cls_bpf)"
)]
pub(crate) struct AttachError {
    pub(crate) ifname: String,
    pub(crate) mode: &'static str,
    #[source]
    pub(crate) source: aya::programs::ProgramError,
}

struct Attached {
    ifname: String,
    value: TcPort,
    /// Dropping it detaches.
    link: SchedClassifierLink,
}

/// The `TC_PORTS` map and the link of every port the classifier is attached to, by the host-side
/// veth's ifindex.
pub(crate) struct TcPorts {
    mode: AttachMode,
    map: HashMap<MapData, u32, TcPort>,
    attached: BTreeMap<u32, Attached>,
    /// With clsact: the slot whose priority every filter gets. Declared last, so the lock is
    /// released only after `drop` has detached every filter.
    instance: Option<Instance>,
}

impl TcPorts {
    /// `instance` is required with [`AttachMode::Clsact`] (and unused with tcx).
    pub(crate) fn new(
        mode: AttachMode,
        map: HashMap<MapData, u32, TcPort>,
        instance: Option<Instance>,
    ) -> TcPorts {
        TcPorts { mode, map, attached: BTreeMap::new(), instance }
    }

    /// Attaches to ports that joined, detaches from ports that left, and updates the container
    /// side of ports whose peer moved (Docker moves it into the container after enslaving the
    /// host side). A port that vanishes while being attached is skipped: the next rescan sees it
    /// gone. Every other failure is returned, and the port stays unattached, so the next sync
    /// tries it again: a port bindtrace cannot watch must not pass silently, nor stop the others.
    pub(crate) fn sync(
        &mut self,
        program: &mut SchedClassifier,
        ports: &BTreeMap<ScopeKey, Port>,
    ) -> Vec<AttachError> {
        let mut failed = Vec::new();
        // A namespace's `lo` (rootless podman) has no host-side veth, and TC_PORTS is keyed by
        // host-side ifindex, which a `lo` (ifindex 1 in every namespace) cannot be: not watched
        // by this hook yet (docs/runtimes.md). Nor can a rootless Docker container's veth, whose
        // peer is in RootlessKit's namespace.
        let wanted: BTreeMap<u32, (&str, TcPort)> = ports
            .values()
            .filter(|p| !p.on_loopback() && !p.in_other_namespace())
            .map(|p| {
                let value = TcPort {
                    netns_cookie: p.ns.cookie,
                    netns_ino: p.ns.inode as u32,
                    ifindex: p.ifindex,
                    bridge: p.bridge,
                    _pad: 0,
                };
                (p.host_ifindex, (p.host_ifname.as_str(), value))
            })
            .collect();

        let gone: Vec<u32> = self.attached.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for ifindex in gone {
            if let Some(a) = self.attached.remove(&ifindex) {
                self.detach(ifindex, a);
            }
        }
        for (&ifindex, &(ifname, value)) in &wanted {
            if let Some(a) = self.attached.get_mut(&ifindex) {
                if a.value != value {
                    if let Err(e) = self.map.insert(ifindex, value, 0) {
                        log::warn!("tc: updating {ifname} in TC_PORTS: {e}");
                    }
                    a.value = value;
                }
                a.ifname = ifname.to_owned();
                continue;
            }
            if let Err(e) = self.map.insert(ifindex, value, 0) {
                log::warn!("tc: adding {ifname} to TC_PORTS: {e}");
                continue;
            }
            match self.attach(program, ifindex, ifname) {
                Ok(Some(link)) => {
                    log::debug!("tc: attached to {ifname} ingress ({})", self.mode.name());
                    self.attached.insert(ifindex, Attached { ifname: ifname.to_owned(), value, link });
                }
                Ok(None) => {
                    log::debug!("tc: {ifname} disappeared before it could be attached");
                    let _ = self.map.remove(&ifindex);
                }
                Err(e) => {
                    let _ = self.map.remove(&ifindex);
                    failed.push(e);
                }
            }
        }
        failed
    }

    /// Ports the hook is attached to now.
    pub(crate) fn attached(&self) -> usize {
        self.attached.len()
    }

    /// Ok(None) when `ifname` no longer names `ifindex` (deleted or renamed meanwhile).
    fn attach(
        &self,
        program: &mut SchedClassifier,
        ifindex: u32,
        ifname: &str,
    ) -> Result<Option<SchedClassifierLink>, AttachError> {
        // aya attaches by name: make sure the name still means the interface the scan saw.
        if ifindex_of(ifname) != Some(ifindex) {
            return Ok(None);
        }
        let err = |source: aya::programs::ProgramError| AttachError {
            ifname: ifname.to_owned(),
            mode: self.mode.name(),
            source,
        };
        let options = match self.mode {
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
                let priority = self.instance.as_ref().map_or(0, Instance::priority);
                TcAttachOptions::Netlink(NlOptions { priority, ..NlOptions::default() })
            }
        };
        match program.attach_with_options(ifname, TcAttachType::Ingress, options) {
            Ok(id) => program.take_link(id).map(Some).map_err(err),
            Err(_) if ifindex_of(ifname) != Some(ifindex) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    fn detach(&mut self, ifindex: u32, a: Attached) {
        use aya::programs::Link as _;
        // A deleted veth took its filter or link with it; detaching then fails harmlessly.
        match a.link.detach() {
            Ok(()) => log::debug!("tc: detached from {}", a.ifname),
            Err(e) => log::debug!("tc: detaching from {}: {e} (interface gone?)", a.ifname),
        }
        let _ = self.map.remove(&ifindex);
    }
}

impl Drop for TcPorts {
    fn drop(&mut self) {
        let all = std::mem::take(&mut self.attached);
        for (ifindex, a) in all {
            self.detach(ifindex, a);
        }
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
    fn tcx_comes_from_btf() {
        assert_eq!(AttachMode::detect(fixture(V6_18)), AttachMode::Tcx);
        assert_eq!(AttachMode::detect(fixture(V6_1)), AttachMode::Clsact);
        assert_eq!(AttachMode::detect(fixture(V5_10)), AttachMode::Clsact);
    }
}
