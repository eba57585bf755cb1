//! The containers of a rootless Docker daemon: its docker0 (or `br-*`) and the containers'
//! veths live in RootlessKit's network namespace, not ours, so the scan of our own links never
//! sees them. Each such container's interfaces are put in scope from inside its namespace
//! (found through its main process, a host pid: RootlessKit makes no pid namespace), and named
//! from inside the daemon's: the veth peer there and the bridge it is a port of.
//!
//! The host-side ifindex of such a port is 0: it is in another namespace, and the tc hook
//! (keyed by ifindex in ours) cannot attach there yet; the tracepoint hooks see the reset in
//! the container's namespace as for any other container.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    sync::Arc,
};

use bindtrace_common::{BridgeId, ScopeKey};

use crate::{
    netns::{
        Netns,
        links::{self, Link},
        loopback::open_workload,
        scope::{Bridges, Port},
    },
    sources::{
        conntrack::TableOf,
        docker::{Container, Runtime},
    },
};

/// The namespaces opened for rootless containers, by inode, held while their container runs.
#[derive(Default)]
pub(crate) struct RootlessNamespaces {
    held: HashMap<u64, Arc<Netns>>,
    /// Each daemon's (RootlessKit's) namespace, by dockerd's pid, held while it has containers.
    daemons: HashMap<u32, Arc<Netns>>,
    /// The namespaces of each daemon's running containers, from the last scan.
    behind: BTreeMap<u32, Vec<u64>>,
}

impl RootlessNamespaces {
    /// A scope entry for each veth of each rootless Docker container in `containers`, on the
    /// bridge its peer is a port of inside the daemon's namespace (added to `bridges` by name);
    /// and the containers that could not be read (name, why).
    pub(crate) fn ports<'a>(
        &mut self,
        bridges: &mut Bridges,
        containers: impl IntoIterator<Item = &'a Container>,
    ) -> (BTreeMap<ScopeKey, Port>, Vec<(String, io::Error)>) {
        let mut ports = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut used = HashMap::new();
        let mut daemons = HashMap::new();
        let mut behind: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        // One dump of each daemon's namespace per scan.
        let mut daemon_links: HashMap<u32, Option<Vec<Link>>> = HashMap::new();
        for c in containers.into_iter().filter(|c| is_rootless_docker(c)) {
            let Some(daemon) = c.rootless_daemon else { continue };
            let ns = match open_workload(&self.held, c) {
                Ok(Some(ns)) => ns,
                Ok(None) => continue,
                Err(e) => {
                    skipped.push((c.name.clone(), e));
                    continue;
                }
            };
            let inner = match ns.run(links::dump_links) {
                Ok(l) => l,
                Err(e) => {
                    skipped.push((c.name.clone(), e));
                    continue;
                }
            };
            let outer = daemon_links.entry(daemon).or_insert_with(|| links_of_pid(daemon).ok());
            used.insert(ns.inode, ns.clone());
            // RootlessKit's namespace: its conntrack table is the one that NATs into the
            // container (`Conntrack::table_for`).
            if let std::collections::hash_map::Entry::Vacant(slot) = daemons.entry(daemon) {
                let opened = match self.daemons.get(&daemon) {
                    Some(known) => Ok(known.clone()),
                    None => {
                        Netns::open(std::path::Path::new(&format!("/proc/{daemon}/ns/net"))).map(Arc::new)
                    }
                };
                match opened {
                    Ok(d) => {
                        slot.insert(d);
                    }
                    Err(e) => log::debug!("the namespace of rootless dockerd {daemon}: {e}"),
                }
            }
            behind.entry(daemon).or_default().push(ns.cookie);
            for link in inner.iter().filter(|l| l.kind.as_deref() == Some("veth")) {
                let peer = link.peer_ifindex.and_then(|i| {
                    outer.as_ref()?.iter().find(|o| o.ifindex == i && o.peer_netnsid.is_some())
                });
                let bridge_name = peer
                    .and_then(|p| p.master)
                    .and_then(|m| outer.as_ref()?.iter().find(|o| o.ifindex == m))
                    .filter(|b| b.kind.as_deref() == Some("bridge"))
                    .map(|b| b.name.clone());
                let bridge = match bridge_name {
                    Some(name) => {
                        bridges.add(&name);
                        bridges.names.iter().position(|n| *n == name).unwrap_or_default() as BridgeId
                    }
                    None => crate::netns::scope::NO_BRIDGE,
                };
                let key = ScopeKey { netns_cookie: ns.cookie, ifindex: link.ifindex, _pad: 0 };
                ports.insert(
                    key,
                    Port {
                        bridge,
                        host_ifname: peer.map(|p| p.name.clone()).unwrap_or_default(),
                        host_ifindex: 0,
                        ns: ns.clone(),
                        ifindex: link.ifindex,
                    },
                );
            }
        }
        // Let go of the namespaces of containers that are gone, so the kernel can free them.
        self.held = used;
        behind.retain(|d, _| daemons.contains_key(d));
        self.daemons = daemons;
        self.behind = behind;
        (ports, skipped)
    }

    /// Each rootless daemon's namespace with its containers' (as of the last scan): the
    /// conntrack tables to follow.
    pub(crate) fn tables(&self) -> Vec<TableOf> {
        self.behind
            .iter()
            .filter_map(|(daemon, into)| {
                let ns = self.daemons.get(daemon)?.clone();
                Some(TableOf { ns, what: format!("rootless dockerd {daemon}"), into: into.clone() })
            })
            .collect()
    }
}

/// A container of a rootless Docker daemon with a namespace of its own. (Rootless podman's
/// containers have no bridge: their `lo` is watched instead, `netns/loopback.rs`.)
fn is_rootless_docker(c: &Container) -> bool {
    c.runtime == Runtime::Docker && c.rootless_daemon.is_some() && c.owns_netns() && c.pid != 0
}

/// The links of the network namespace process `pid` runs in.
fn links_of_pid(pid: u32) -> io::Result<Vec<Link>> {
    let file = File::open(format!("/proc/{pid}/ns/net"))?;
    crate::netns::run_in(std::os::fd::AsFd::as_fd(&file), links::dump_links)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(runtime: Runtime, daemon: Option<u32>, mode: &str) -> Container {
        Container {
            runtime,
            id: "c0ffee".into(),
            name: "rootless-web".into(),
            image: "img".into(),
            compose_project: None,
            compose_service: None,
            pod: None,
            namespace: None,
            rootless_daemon: daemon,
            running: true,
            pid: std::process::id(),
            started_at: None,
            sandbox_key: None,
            network_mode: mode.into(),
            netns_inodes: vec![],
            networks: vec![],
            ports: vec![],
        }
    }

    #[test]
    fn only_rootless_docker_containers_with_a_namespace_of_their_own() {
        assert!(is_rootless_docker(&container(Runtime::Docker, Some(1), "bridge")));
        assert!(!is_rootless_docker(&container(Runtime::Docker, None, "bridge")), "rootful");
        assert!(!is_rootless_docker(&container(Runtime::Podman, Some(1), "slirp4netns")), "podman: lo");
        assert!(!is_rootless_docker(&container(Runtime::Docker, Some(1), "host")));
        assert!(!is_rootless_docker(&container(Runtime::Docker, Some(1), "container:abc")));
    }

    /// A container whose pid is not in the namespace its runtime reported is not read.
    #[test]
    fn a_reused_pid_is_skipped() {
        let mut held = RootlessNamespaces::default();
        let mut bridges = Bridges { names: vec![] };
        let mut c = container(Runtime::Docker, Some(1), "bridge");
        c.netns_inodes = vec![1];
        let (ports, skipped) = held.ports(&mut bridges, [&c]);
        assert!(ports.is_empty() && skipped.is_empty(), "{ports:?} {skipped:?}");
        assert!(bridges.names.is_empty());
    }
}
