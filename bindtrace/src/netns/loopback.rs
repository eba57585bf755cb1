//! Namespaces whose `lo` carries forwarded connections: rootless podman's (slirp4netns), where
//! the port forwarder (`rootlessport`, re-executed as rootlessport-child inside the container's
//! namespace) dials the container's own address, so the SYN and its reset never leave the
//! namespace. No bridge and no veth see them: the scope entry is the namespace's `lo`, marked
//! [`BRIDGE_LOOPBACK`] so that the kernel counts only refusals to a non-loopback destination
//! there (the app talking to 127.0.0.1 is not a forwarded connection).
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    sync::Arc,
};

use bindtrace_common::{BRIDGE_LOOPBACK, LOOPBACK_IFINDEX, ScopeKey};

use crate::{
    netns::{Netns, scope::Port},
    sources::docker::Container,
};

/// The namespaces opened for loopback ports, by inode, held while their container runs.
#[derive(Default)]
pub(crate) struct LoopbackNamespaces {
    held: HashMap<u64, Arc<Netns>>,
}

impl LoopbackNamespaces {
    /// A scope entry for the `lo` of each container in `containers` that forwards over it,
    /// and the containers whose namespace could not be opened (name, why). A container whose
    /// process has left (it stopped, or its pid is another process's now) is skipped: its
    /// namespace is found through `/proc/PID/ns/net` and checked against the inodes the
    /// runtime reported.
    pub(crate) fn ports<'a>(
        &mut self,
        containers: impl IntoIterator<Item = &'a Container>,
    ) -> (BTreeMap<ScopeKey, Port>, Vec<(String, io::Error)>) {
        let mut ports = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut used = HashMap::new();
        for c in containers.into_iter().filter(|c| c.forwards_over_loopback()) {
            let ns = match self.open(c) {
                Ok(Some(ns)) => ns,
                Ok(None) => continue,
                Err(e) => {
                    skipped.push((c.name.clone(), e));
                    continue;
                }
            };
            used.insert(ns.inode, ns.clone());
            let key = ScopeKey { netns_cookie: ns.cookie, ifindex: LOOPBACK_IFINDEX, _pad: 0 };
            ports.insert(key, loopback_port(ns));
        }
        // Let go of the namespaces of containers that are gone, so the kernel can free them.
        self.held = used;
        (ports, skipped)
    }

    /// The container's namespace: the one held, or opened through its main process.
    fn open(&self, c: &Container) -> io::Result<Option<Arc<Netns>>> {
        open_workload(&self.held, c)
    }
}

/// A container's namespace, through its main process, checked against the inodes its runtime
/// reported: one in `held` (by inode) or newly opened. Ok(None) when its process is gone or its
/// pid is another process's now.
pub(crate) fn open_workload(
    held: &HashMap<u64, Arc<Netns>>,
    c: &Container,
) -> io::Result<Option<Arc<Netns>>> {
    {
        if c.pid == 0 {
            return Ok(None);
        }
        let file = match File::open(format!("/proc/{}/ns/net", c.pid)) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ESRCH) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let inode = file.metadata()?.ino();
        if !c.netns_inodes.contains(&inode) {
            // The pid was reused, or the process moved: not this container's namespace.
            return Ok(None);
        }
        if let Some(ns) = held.get(&inode) {
            return Ok(Some(ns.clone()));
        }
        Ok(Some(Arc::new(Netns::from_file(file)?)))
    }
}

/// The scope entry of a namespace's `lo`: no bridge and no host-side veth.
pub(crate) fn loopback_port(ns: Arc<Netns>) -> Port {
    Port {
        bridge: BRIDGE_LOOPBACK,
        host_ifname: String::new(),
        host_ifindex: 0,
        host_elsewhere: None,
        ns,
        ifindex: LOOPBACK_IFINDEX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::docker::{Binding, PortMapping, Runtime};

    fn container(pid: u32, inodes: Vec<u64>, mode: &str) -> Container {
        Container {
            runtime: Runtime::Podman,
            id: "c0ffee".into(),
            name: "rootless-web".into(),
            image: "img".into(),
            compose_project: None,
            compose_service: None,
            pod: None,
            namespace: None,
            rootless_daemon: None,
            running: true,
            pid,
            started_at: None,
            sandbox_key: None,
            network_mode: mode.into(),
            netns_inodes: inodes,
            networks: vec![],
            ports: vec![PortMapping {
                container_port: 8000,
                proto: "tcp".into(),
                bindings: vec![Binding { host_ip: "0.0.0.0".parse().unwrap(), host_port: 18080 }],
            }],
        }
    }

    /// Our own process stands in for a container's: its namespace is opened, keyed by its
    /// cookie on ifindex 1, and let go once the container is no longer listed.
    #[test]
    fn a_slirp4netns_container_gets_its_lo_in_scope() {
        if !crate::testing::root_or_skip("reads the namespace cookie with setns") {
            return;
        }
        let me = std::process::id();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let mut held = LoopbackNamespaces::default();
        let c = container(me, vec![own], "slirp4netns");
        let (ports, skipped) = held.ports([&c]);
        assert!(skipped.is_empty(), "{skipped:?}");
        let (key, port) = ports.iter().next().expect("one port");
        assert_eq!(key.ifindex, LOOPBACK_IFINDEX);
        assert_eq!(key.netns_cookie, Netns::own().unwrap().cookie);
        assert_eq!(port.bridge, BRIDGE_LOOPBACK);
        assert_eq!(port.ns.inode, own);
        assert_eq!(held.held.len(), 1);
        let (ports, _) = held.ports([]);
        assert!(ports.is_empty());
        assert!(held.held.is_empty(), "a gone container's namespace is let go");
    }

    #[test]
    fn only_loopback_forwarders_and_only_their_own_namespace() {
        let me = std::process::id();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let mut held = LoopbackNamespaces::default();
        // A bridge container: its veth is in scope through its bridge, not its lo.
        let bridged = container(me, vec![own], "bridge");
        // A pid whose namespace is not the one the runtime reported (reused pid).
        let reused = container(me, vec![own + 1], "slirp4netns");
        // A stopped container.
        let stopped = container(0, vec![own], "slirp4netns");
        let (ports, skipped) = held.ports([&bridged, &reused, &stopped]);
        assert!(ports.is_empty(), "{ports:?}");
        assert!(skipped.is_empty());
    }
}
