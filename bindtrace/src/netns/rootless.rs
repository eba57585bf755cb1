//! The containers of a rootless Docker daemon: its docker0 (or `br-*`) and the containers'
//! veths live in RootlessKit's network namespace, not ours, so the scan of our own links never
//! sees them. Each such container's interfaces are put in scope from inside its namespace
//! (found through its main process, a host pid: RootlessKit makes no pid namespace), and named
//! from inside the daemon's: the veth peer there and the bridge it is a port of.
//!
//! The host-side ifindex of such a port is 0: it is in another namespace. The port carries that
//! namespace (held open) and the peer's ifindex there instead, where the tc hook attaches (with
//! a classifier copy of that namespace's slot, `kernel/tc.rs`); the tracepoint hooks see the
//! reset in the container's namespace as for any other container.
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    os::unix::fs::MetadataExt,
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
    /// The daemons' (RootlessKit's) namespaces, by inode, held while one of their containers
    /// is in scope: the tc hook attaches there.
    daemons: HashMap<u64, Arc<Netns>>,
    /// Each daemon (by dockerd's pid): its namespace and its running containers' namespaces
    /// (cookies), from the last scan. Its conntrack table NATs into them.
    behind: BTreeMap<u32, (Arc<Netns>, Vec<u64>)>,
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
        // One dump of each daemon's namespace per scan.
        let mut daemon_links: HashMap<u32, Option<DaemonNamespace>> = HashMap::new();
        let mut daemons_used = HashMap::new();
        let mut behind: BTreeMap<u32, (Arc<Netns>, Vec<u64>)> = BTreeMap::new();
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
            let outer =
                daemon_links.entry(daemon).or_insert_with(|| daemon_namespace(&self.daemons, daemon).ok());
            if let Some((dns, _)) = outer {
                daemons_used.insert(dns.inode, dns.clone());
                // RootlessKit's namespace: its conntrack table is the one that NATs into the
                // container (`Conntrack::table_for`).
                behind.entry(daemon).or_insert_with(|| (dns.clone(), Vec::new())).1.push(ns.cookie);
            }
            let daemon_ns = outer.as_ref().map(|(dns, _)| dns.clone());
            let outer = outer.as_ref().map(|(_, links)| links);
            used.insert(ns.inode, ns.clone());
            for link in inner.iter().filter(|l| l.kind.as_deref() == Some("veth")) {
                let peer = link
                    .peer_ifindex
                    .and_then(|i| outer?.iter().find(|o| o.ifindex == i && o.peer_netnsid.is_some()));
                let bridge_name = peer
                    .and_then(|p| p.master)
                    .and_then(|m| outer?.iter().find(|o| o.ifindex == m))
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
                        host_elsewhere: peer.zip(daemon_ns.clone()).map(|(p, dns)| (dns, p.ifindex)),
                        ns: ns.clone(),
                        ifindex: link.ifindex,
                    },
                );
            }
        }
        // Let go of the namespaces of containers that are gone, so the kernel can free them.
        self.held = used;
        self.daemons = daemons_used;
        self.behind = behind;
        (ports, skipped)
    }

    /// Each rootless daemon's namespace with its containers' (as of the last scan): the
    /// conntrack tables to follow.
    pub(crate) fn tables(&self) -> Vec<TableOf> {
        self.behind
            .iter()
            .map(|(daemon, (ns, into))| TableOf {
                ns: ns.clone(),
                what: format!("rootless dockerd {daemon}"),
                into: into.clone(),
            })
            .collect()
    }
}

/// A container of a rootless Docker daemon with a namespace of its own. (Rootless podman's
/// containers have no bridge: their `lo` is watched instead, `netns/loopback.rs`.)
fn is_rootless_docker(c: &Container) -> bool {
    c.runtime == Runtime::Docker && c.rootless_daemon.is_some() && c.owns_netns() && c.pid != 0
}

/// A daemon's (RootlessKit's) namespace and its links.
type DaemonNamespace = (Arc<Netns>, Vec<Link>);

/// The network namespace process `pid` runs in (the one held if it is that), and its links.
fn daemon_namespace(held: &HashMap<u64, Arc<Netns>>, pid: u32) -> io::Result<DaemonNamespace> {
    let file = File::open(format!("/proc/{pid}/ns/net"))?;
    let inode = file.metadata()?.ino();
    let ns = match held.get(&inode) {
        Some(ns) => ns.clone(),
        None => Arc::new(Netns::from_file(file)?),
    };
    let links = ns.run(links::dump_links)?;
    Ok((ns, links))
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
