//! Which interfaces are in scope: the container-side ends of veths whose host-side end is a port
//! of a selected bridge, and those whose other end is in a workload's namespace (a runtime
//! reported it), on a bridge or routed without one (a /32 route, as Calico does); identified by
//! (namespace cookie, ifindex).
//!
//! An address in the bridge's prefix would not do: docker-in-docker and parallel test
//! topologies reuse 172.17.0.0/16, and a container on two networks must be reported on the
//! bridge its SYN came through. The set is recomputed whenever rtnetlink reports a link change,
//! which covers Docker's order (the host-side veth is enslaved while its peer is still in the
//! host's namespace, then the peer moves) and ports that leave.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::MetadataExt as _},
    sync::Arc,
    time::{Duration, Instant},
};

use bindtrace_common::{BRIDGE_LOOPBACK, BridgeId, ScopeKey};

use crate::{
    netns::links::{self, Link},
    netns::{self, Netns},
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ScopeError {
    #[error("no interface named {name} in bindtrace's network namespace; bridges here: {}", list_or_none(.bridges))]
    NoSuchInterface { name: String, bridges: Vec<String> },
    #[error("{name} is not a bridge (it is a {kind} interface); bridges here: {}", list_or_none(.bridges))]
    NotABridge { name: String, kind: String, bridges: Vec<String> },
    #[error("reading network interfaces (rtnetlink): {0}")]
    Netlink(#[from] io::Error),
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

/// A container-side interface in scope, with the namespace it lives in (held open).
#[derive(Debug, Clone)]
pub(crate) struct Port {
    pub(crate) bridge: BridgeId,
    /// Host-side veth name, e.g. `veth1a2b3c`.
    pub(crate) host_ifname: String,
    /// Host-side veth ifindex, in bindtrace's namespace (the tc hook attaches there).
    pub(crate) host_ifindex: u32,
    /// When the host side is in another namespace than ours (rootless Docker's veths, in
    /// RootlessKit's): that namespace and the host side's ifindex there, where the tc hook
    /// attaches. None for ports whose host side is here, a `lo`, or a peer not found.
    pub(crate) host_elsewhere: Option<(Arc<Netns>, u32)>,
    pub(crate) ns: Arc<Netns>,
    pub(crate) ifindex: u32,
}

impl Port {
    /// Whether this is a namespace's `lo` that a forwarder dials through (see
    /// `netns/loopback.rs`), not a veth on a bridge.
    pub(crate) fn on_loopback(&self) -> bool {
        self.bridge == BRIDGE_LOOPBACK
    }

    /// Whether its bridge and peer are in another namespace than ours (rootless Docker's
    /// RootlessKit namespace, `netns/rootless.rs`): no host-side ifindex here.
    pub(crate) fn in_other_namespace(&self) -> bool {
        self.host_ifindex == 0 && !self.on_loopback()
    }

    /// How the log names it: the host-side veth, or the namespace's `lo`.
    pub(crate) fn shown(&self) -> String {
        if self.on_loopback() { format!("lo of netns {}", self.ns.inode) } else { self.host_ifname.clone() }
    }

    /// Where the log says it is: its bridge, or that it is a forwarder's `lo`.
    pub(crate) fn on<'a>(&self, bridges: &'a Bridges) -> &'a str {
        match self.bridge {
            BRIDGE_LOOPBACK => "rootless forwarder",
            NO_BRIDGE => "routed",
            id => bridges.name(id),
        }
    }
}

/// The selected bridges, by name, in the order given; their index is the [`BridgeId`].
#[derive(Debug, Clone)]
pub(crate) struct Bridges {
    pub(crate) names: Vec<String>,
}

/// The bridge id of a routed veth: no bridge (its name is empty, reported as null). One below
/// [`BRIDGE_LOOPBACK`] (the kernel's mark for a forwarder's `lo`), so the two never meet.
pub(crate) const NO_BRIDGE: BridgeId = BRIDGE_LOOPBACK - 1;

impl Bridges {
    /// The bridge's name; empty for a namespace's `lo` ([`BRIDGE_LOOPBACK`]) and a routed veth
    /// ([`NO_BRIDGE`]), which have none.
    pub(crate) fn name(&self, id: BridgeId) -> &str {
        if id == NO_BRIDGE || id == BRIDGE_LOOPBACK {
            return "";
        }
        self.names.get(id as usize).map(String::as_str).unwrap_or("?")
    }

    /// Adds a bridge to watch (a Docker network created while running); true if it is new.
    /// Names are never removed, so ids stay valid: a bridge that is gone just has no ports.
    pub(crate) fn add(&mut self, name: &str) -> bool {
        if self.names.iter().any(|n| n == name) {
            return false;
        }
        self.names.push(name.to_owned());
        true
    }
}

/// The bridge Docker creates by default.
pub(crate) const DOCKER0: &str = "docker0";

/// The start set when no `-i` is given: docker0 when it exists here (Docker's networks are
/// added as the Docker API reports them). Without Docker, docker0 must exist, as with `-i`.
pub(crate) fn validate_auto(docker: bool) -> Result<Bridges, ScopeError> {
    match validate(&[DOCKER0.to_owned()]) {
        Ok(b) => Ok(b),
        Err(ScopeError::NoSuchInterface { .. }) if docker => Ok(Bridges { names: Vec::new() }),
        Err(e) => Err(e),
    }
}

/// Checks that every selected name is a bridge of this namespace.
pub(crate) fn validate(names: &[String]) -> Result<Bridges, ScopeError> {
    let links = links::dump_links()?;
    let bridges: Vec<String> =
        links.iter().filter(|l| l.kind.as_deref() == Some("bridge")).map(|l| l.name.clone()).collect();
    for name in names {
        match links.iter().find(|l| &l.name == name) {
            None => return Err(ScopeError::NoSuchInterface { name: name.clone(), bridges }),
            Some(l) if l.kind.as_deref() != Some("bridge") => {
                return Err(ScopeError::NotABridge {
                    name: name.clone(),
                    kind: l.kind.clone().unwrap_or_else(|| "plain".into()),
                    bridges,
                });
            }
            Some(_) => {}
        }
    }
    Ok(Bridges { names: names.to_vec() })
}

/// Resolves bridge ports to namespaces, caching open namespaces by the id our namespace gives
/// them. Namespaces are held open only while a port of theirs is in scope.
pub(crate) struct Resolver {
    own: Arc<Netns>,
    by_nsid: HashMap<i32, Arc<Netns>>,
    /// Held namespaces found only as `/proc/PID/ns/net` of some process, with neither a handle
    /// under [`netns::HANDLE_DIRS`] (whose removal inotify reports) nor a runtime that sends an
    /// event when its workload stops. Only these are checked on a timer.
    unannounced: HashSet<i32>,
    /// inotify on the handle directories is unavailable: every held namespace is checked on the
    /// timer.
    handles_unwatched: bool,
    next_orphan_check: Instant,
}

/// How often namespaces held open that no event covers are checked for being alive only
/// through bindtrace.
const ORPHAN_CHECK: Duration = Duration::from_secs(10);

/// The ports found on the watched bridges, and those skipped because their namespace could
/// not be opened (interface name, why).
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    pub(crate) ports: BTreeMap<ScopeKey, Port>,
    pub(crate) skipped: Vec<(String, io::Error)>,
}

impl Resolver {
    pub(crate) fn new() -> io::Result<Resolver> {
        Ok(Resolver {
            own: Arc::new(Netns::own()?),
            by_nsid: HashMap::new(),
            unannounced: HashSet::new(),
            handles_unwatched: false,
            next_orphan_check: Instant::now(),
        })
    }

    /// The current scope: every container-side interface of every port of `bridges`, and of
    /// every veth whose other end is in the namespace of one of the `workloads` (their main
    /// processes' pids). The bridge of such a veth joins `bridges` (its other ports are then in
    /// scope too); a veth on no bridge is in scope with [`NO_BRIDGE`]. A bridge that has
    /// disappeared simply has no ports.
    pub(crate) fn resolve(&mut self, bridges: &mut Bridges, workloads: &[u32]) -> io::Result<Resolved> {
        let links = links::dump_links()?;
        let workload_nsids = self.workload_nsids(workloads)?;
        let bridge_name: HashMap<u32, &str> = links
            .iter()
            .filter(|l| l.kind.as_deref() == Some("bridge"))
            .map(|l| (l.ifindex, l.name.as_str()))
            .collect();
        let mut scope = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut used = HashMap::new();
        for link in &links {
            let Some(peer_ifindex) = link.peer_ifindex.filter(|_| is_veth(link)) else { continue };
            let master = link.master.and_then(|m| bridge_name.get(&m).copied());
            let selected = master.and_then(|name| bridges.names.iter().position(|n| n == name));
            let bridge = match (selected, master) {
                (Some(id), _) => id as BridgeId,
                _ if !link.peer_netnsid.is_some_and(|id| workload_nsids.contains(&id)) => continue,
                (None, Some(name)) => {
                    log::info!("following bridge {name} (a workload's veth {} is on it)", link.name);
                    bridges.add(name);
                    (bridges.names.len() - 1) as BridgeId
                }
                (None, None) => NO_BRIDGE,
            };
            let ns = match link.peer_netnsid {
                // Peer still in our namespace (Docker moves it an instant later).
                None => self.own.clone(),
                Some(nsid) => match self.namespace(nsid) {
                    Ok(Some(ns)) => ns,
                    Ok(None) => {
                        log::debug!("port {}: no namespace found for nsid {nsid} yet", link.name);
                        continue;
                    }
                    Err(e) => {
                        skipped.push((link.name.clone(), e));
                        continue;
                    }
                },
            };
            if let Some(nsid) = link.peer_netnsid {
                used.insert(nsid, ns.clone());
            }
            let key = ScopeKey { netns_cookie: ns.cookie, ifindex: peer_ifindex, _pad: 0 };
            scope.insert(
                key,
                Port {
                    bridge,
                    host_ifname: link.name.clone(),
                    host_ifindex: link.ifindex,
                    host_elsewhere: None,
                    ns,
                    ifindex: peer_ifindex,
                },
            );
        }
        // Let go of namespaces no port refers to any more, so they can be freed.
        self.by_nsid = used;
        self.unannounced.retain(|id| self.by_nsid.contains_key(id));
        Ok(Resolved { ports: scope, skipped })
    }

    /// The ids our namespace gives the namespaces of processes `pids` (those it has given one:
    /// a namespace with a veth to ours has), each opened and cached for [`Self::namespace`].
    fn workload_nsids(&mut self, pids: &[u32]) -> io::Result<HashSet<i32>> {
        let mut out = HashSet::new();
        for pid in pids {
            let file = match File::open(format!("/proc/{pid}/ns/net")) {
                Ok(f) => f,
                Err(e) if netns::out_of_resources(&e) => return Err(e),
                // Gone meanwhile: the next inventory says so.
                Err(_) => continue,
            };
            let Ok(Some(nsid)) = links::netnsid_of(file.as_fd()) else { continue };
            let inode = file.metadata()?.ino();
            if self.by_nsid.get(&nsid).is_none_or(|ns| ns.inode != inode) {
                self.by_nsid.insert(nsid, Arc::new(Netns::from_file(file)?));
            }
            // Its runtime says when the workload stops.
            self.unannounced.remove(&nsid);
            out.insert(nsid);
        }
        Ok(out)
    }

    /// Lets go of held namespaces that nothing but bindtrace keeps alive: no handle under
    /// [`netns::HANDLE_DIRS`] and no process inside (`ip netns del` while the namespace's veth is
    /// still on a watched bridge). Holding one would keep the namespace, so its veth, so its port
    /// in scope, so the namespace: forever. Returns how many were let go; the caller then rescans, which cannot find them any more, so their
    /// ports leave scope, and once the departed grace is over the namespace is freed.
    ///
    /// `forced`: an event said a namespace may have gone (a handle removed, a runtime event, a
    /// rescan); otherwise the check runs only when [`Self::orphan_check_due`] is.
    pub(crate) fn release_orphans(&mut self, now: Instant, forced: bool) -> io::Result<usize> {
        if self.by_nsid.is_empty() || !(forced || self.orphan_check_due().is_some_and(|t| now >= t)) {
            return Ok(0);
        }
        self.next_orphan_check = now + ORPHAN_CHECK;
        // While we hold a namespace its inode is not reused: an inode found is that namespace.
        let reachable: HashSet<u64> = netns::candidates()?.into_iter().map(|c| c.inode).collect();
        let before = self.by_nsid.len();
        self.by_nsid.retain(|_, ns| reachable.contains(&ns.inode));
        self.unannounced.retain(|id| self.by_nsid.contains_key(id));
        Ok(before - self.by_nsid.len())
    }

    /// When the timer must check for orphans: only while a namespace no event covers is held
    /// (an idle host with Docker's, podman's or `ip netns` namespaces needs no timer).
    pub(crate) fn orphan_check_due(&self) -> Option<Instant> {
        let timer_needed =
            !self.unannounced.is_empty() || (self.handles_unwatched && !self.by_nsid.is_empty());
        timer_needed.then_some(self.next_orphan_check)
    }

    /// No inotify on the handle directories (none at start, or it failed): the timer checks
    /// every held namespace from now on.
    pub(crate) fn watch_lost(&mut self) {
        self.handles_unwatched = true;
    }

    /// The namespace our namespace calls `nsid`. A cached one is re-checked (ids are reused
    /// once a namespace dies); otherwise every namespace reachable from here is asked.
    /// Ok(None) when no namespace has that id (yet); an error when one could not be opened for
    /// want of resources (EMFILE, ENFILE, ENOMEM): that port is then skipped, and said so.
    fn namespace(&mut self, nsid: i32) -> io::Result<Option<Arc<Netns>>> {
        if let Some(ns) = self.by_nsid.get(&nsid) {
            match links::netnsid_of(ns.file.as_fd()) {
                Ok(Some(id)) if id == nsid => return Ok(Some(ns.clone())),
                // Out of fds or memory, the check itself failed: keep what we hold. The
                // namespace cannot be gone (the handle keeps it alive), and while it lives no
                // other namespace can take its id, so dropping it would only push a watched
                // port out of scope until the retry.
                Err(e) if netns::out_of_resources(&e) => return Ok(Some(ns.clone())),
                _ => {}
            }
        }
        for candidate in netns::candidates()? {
            let file = match File::open(&candidate.path) {
                Ok(f) => f,
                Err(e) if netns::out_of_resources(&e) => return Err(e),
                // The process exited, or its namespace is not ours to open: not this one.
                Err(_) => continue,
            };
            let id = match links::netnsid_of(file.as_fd()) {
                Ok(id) => id,
                Err(e) if netns::out_of_resources(&e) => return Err(e),
                Err(_) => None,
            };
            if id == Some(nsid) {
                let ns = Arc::new(Netns::from_file(file)?);
                self.by_nsid.insert(nsid, ns.clone());
                if netns::HANDLE_DIRS.iter().any(|d| candidate.path.starts_with(d)) {
                    self.unannounced.remove(&nsid);
                } else {
                    self.unannounced.insert(nsid);
                }
                return Ok(Some(ns));
            }
        }
        Ok(None)
    }
}

fn is_veth(link: &Link) -> bool {
    link.kind.as_deref() == Some("veth")
}
