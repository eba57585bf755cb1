//! Which clsact filters are this bindtrace's, which a killed one left, and which are another
//! tool's.
//!
//! A cls_bpf filter outlives the process that attached it: after a SIGKILL on a kernel without
//! tcx, the dead bindtrace's filters keep running its program. Several bindtraces may run on one
//! host (an image and a package), so "a filter of ours" is not enough to remove it. Each
//! instance therefore holds a slot: a lock file `/run/bindtrace/tc-SLOT.lock` held with
//! `flock` for as long as it runs (the kernel releases it when the process dies, however it
//! dies), and attaches every filter at priority `PRIORITY_BASE + SLOT`. At start, every slot
//! whose lock nobody holds belongs to no live bindtrace: filters at its priority named after our
//! program are what a dead one left, and are deleted. A filter at another priority or with
//! another name (another tool's, or a live bindtrace's) is never touched.
//!
//! The slots being cleaned stay locked while they are cleaned, so a bindtrace starting at the
//! same moment takes another slot instead of attaching filters we would then delete. At start the
//! interfaces of bindtrace's own network namespace are looked at; each other namespace the tc
//! hook attaches in (RootlessKit's, a rootless podman container's) is looked at before its first
//! filter there. A namespace never attached in again keeps a dead instance's filters until it
//! goes (with its container or daemon); they count into maps nobody reads.
use std::{
    fs::{File, OpenOptions},
    io,
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::{
    netlink,
    netns::{Netns, links},
};

/// Where the slots' lock files live.
pub(crate) const LOCK_DIR: &str = "/run/bindtrace";
/// How many bindtraces may attach clsact filters on one host at once.
pub(crate) const SLOTS: u16 = 64;
/// Slot N attaches at priority `PRIORITY_BASE + N`: above the kernel's default of 49152 for a
/// first filter, below what `tc` picks by default for later ones, and in no range iproute2 or
/// Cilium use by convention.
pub(crate) const PRIORITY_BASE: u16 = 0xb700;

/// The slot this bindtrace holds (and its lock) for as long as it runs.
#[derive(Debug)]
pub(crate) struct Instance {
    slot: u16,
    dir: PathBuf,
    /// Held with `flock(LOCK_EX)`: closing it (or dying) releases the slot.
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum InstanceError {
    #[error(
        "the tc hook (clsact) takes a lock file in {dir} to tell its filters from those of other \
         bindtraces: {source}. Give bindtrace a writable {dir} (a tmpfs /run)"
    )]
    Dir { dir: String, source: io::Error },
    #[error(
        "all {SLOTS} tc instance slots in {dir} are held by running bindtraces: stop one, or use a \
         kernel with tcx (6.6+)"
    )]
    Full { dir: String },
}

impl Instance {
    /// Takes the first free slot in `dir`.
    pub(crate) fn acquire(dir: &Path) -> Result<Instance, InstanceError> {
        let err = |source| InstanceError::Dir { dir: dir.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        for slot in 0..SLOTS {
            if let Some(lock) = try_lock(&lock_path(dir, slot)).map_err(err)? {
                return Ok(Instance { slot, dir: dir.to_owned(), _lock: lock });
            }
        }
        Err(InstanceError::Full { dir: dir.display().to_string() })
    }

    pub(crate) fn slot(&self) -> u16 {
        self.slot
    }

    /// The priority of every filter this instance attaches.
    pub(crate) fn priority(&self) -> u16 {
        PRIORITY_BASE + self.slot
    }

    /// Deletes the filters of `program` (or of one of its namespace copies, `program_N`) that
    /// dead bindtraces left on the ingress of this namespace's interfaces: at our own slot's
    /// priority (its last holder died) and at every slot nobody holds. Returns how many were
    /// deleted and where. Interfaces that vanish meanwhile are skipped.
    pub(crate) fn remove_dead_filters(&self, program: &str) -> io::Result<Vec<Removed>> {
        let (held, dead) = self.dead_priorities()?;
        let removed = reap(&dead, program);
        // Locked while we cleaned: nobody attached at these meanwhile.
        drop(held);
        removed
    }

    /// The same in the network namespace `ns` (one the tc hook is about to attach in).
    pub(crate) fn remove_dead_filters_in(&self, program: &str, ns: &Netns) -> io::Result<Vec<Removed>> {
        let (held, dead) = self.dead_priorities()?;
        let removed = ns.run(|| reap(&dead, program));
        drop(held);
        removed
    }

    /// The priorities of dead instances' filters: our own slot's and every slot nobody holds,
    /// with the locks of the latter, to hold while their filters are deleted.
    fn dead_priorities(&self) -> io::Result<(Vec<File>, Vec<u16>)> {
        let mut held = Vec::new();
        let mut dead = vec![self.priority()];
        for slot in (0..SLOTS).filter(|&s| s != self.slot) {
            if let Some(lock) = try_lock(&lock_path(&self.dir, slot))? {
                held.push(lock);
                dead.push(PRIORITY_BASE + slot);
            }
        }
        Ok((held, dead))
    }
}

/// Deletes our program's filters at a priority in `dead` from every interface of the calling
/// thread's namespace.
fn reap(dead: &[u16], program: &str) -> io::Result<Vec<Removed>> {
    let mut removed = Vec::new();
    for link in links::dump_links()? {
        let filters = match ingress_filters(link.ifindex) {
            Ok(f) => f,
            Err(e) => {
                log::debug!("tc: listing the filters of {}: {e} (gone?)", link.name);
                continue;
            }
        };
        for f in filters.into_iter().filter(|f| is_ours(&f.name, program) && dead.contains(&f.priority)) {
            match delete_filter(link.ifindex, &f) {
                Ok(()) => removed.push(Removed { ifname: link.name.clone(), priority: f.priority }),
                Err(e) => log::debug!("tc: deleting a dead bindtrace's filter on {}: {e}", link.name),
            }
        }
    }
    Ok(removed)
}

/// Whether a filter's program name is `program` or one of its copies (`program_N`).
fn is_ours(name: &str, program: &str) -> bool {
    match name.strip_prefix(program) {
        Some("") => true,
        Some(rest) => {
            rest.strip_prefix('_').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }
        None => false,
    }
}

/// A filter a dead bindtrace left, deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removed {
    pub(crate) ifname: String,
    pub(crate) priority: u16,
}

fn lock_path(dir: &Path, slot: u16) -> PathBuf {
    dir.join(format!("tc-{slot}.lock"))
}

/// The lock file, locked, or None when a live process holds it.
fn try_lock(path: &Path) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(None),
        _ => Err(e),
    }
}

/// One cls_bpf filter on an ingress hook.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BpfFilter {
    priority: u16,
    protocol: u16,
    handle: TcHandle,
    /// TCA_BPF_NAME: the name of the program it runs (aya sets the program's).
    name: String,
}

/// The clsact ingress parent, `ffff:fff2`.
const INGRESS_PARENT: TcHandle = TcHandle { major: 0xffff, minor: TcHandle::MIN_INGRESS };

/// The cls_bpf filters on the ingress hook of `ifindex` (none without a clsact qdisc).
fn ingress_filters(ifindex: u32) -> io::Result<Vec<BpfFilter>> {
    let replies = netlink::dump(NETLINK_ROUTE, "filter dump", || {
        let mut m = TcMessage::default();
        m.header.index = ifindex as i32;
        m.header.parent = INGRESS_PARENT;
        RouteNetlinkMessage::GetTrafficFilter(m)
    })?;
    Ok(replies
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(m) => bpf_filter(&m),
            _ => None,
        })
        .collect())
}

fn bpf_filter(m: &TcMessage) -> Option<BpfFilter> {
    let is_bpf = m.attributes.iter().any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
    let name = m.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => Some(n.clone()),
            _ => None,
        }),
        _ => None,
    })?;
    // tcm_info: the priority in the upper 16 bits, the protocol (network order) below.
    let (priority, protocol) = ((m.header.info >> 16) as u16, m.header.info as u16);
    is_bpf.then_some(BpfFilter { priority, protocol, handle: m.header.handle, name })
}

fn delete_filter(ifindex: u32, f: &BpfFilter) -> io::Result<()> {
    let mut m = TcMessage::default();
    m.header.index = ifindex as i32;
    m.header.parent = INGRESS_PARENT;
    m.header.handle = f.handle;
    m.header.info = (u32::from(f.priority) << 16) | u32::from(f.protocol);
    m.attributes.push(TcAttribute::Kind("bpf".into()));
    netlink::transact(NETLINK_ROUTE, NLM_F_REQUEST | NLM_F_ACK, RouteNetlinkMessage::DelTrafficFilter(m))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_slot_is_skipped_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("bindtrace-slots-{}", std::process::id()));
        let first = Instance::acquire(&dir).unwrap();
        let second = Instance::acquire(&dir).unwrap();
        assert_eq!((first.slot(), second.slot()), (0, 1));
        assert_eq!(second.priority(), PRIORITY_BASE + 1);
        drop(first);
        let third = Instance::acquire(&dir).unwrap();
        assert_eq!(third.slot(), 0, "a released slot is free again");
        drop((second, third));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_copies_of_the_classifier_are_ours_and_nothing_else() {
        assert!(is_ours("bt_tc", "bt_tc"));
        assert!(is_ours("bt_tc_1", "bt_tc"));
        assert!(is_ours("bt_tc_7", "bt_tc"));
        assert!(!is_ours("bt_tc_", "bt_tc"));
        assert!(!is_ours("bt_tc_x", "bt_tc"));
        assert!(!is_ours("bt_tcx", "bt_tc"));
        assert!(!is_ours("cil_from_container", "bt_tc"));
    }
}
