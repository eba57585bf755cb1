//! Docker: which container a namespace is, what it publishes, which bridges Docker's networks
//! use, kept current from the Engine API's event stream.
//!
//! Everything here is optional to the detector: without a reachable daemon (podman, plain
//! namespaces, a stopped dockerd) bindtrace reports by namespace and address, warns once, and
//! picks Docker up again when it comes back ([`watch`]).
pub(crate) mod api;
pub(crate) mod appear;
pub(crate) mod daemon;
pub(crate) mod http;
pub(crate) mod watch;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

pub(crate) use http::{Client, DockerError};

/// Where the Docker API is when nothing says otherwise.
pub(crate) const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Where rootful podman's Docker-compatible API is (`podman system service`, or the
/// `podman.socket` unit), followed next to Docker's.
pub(crate) const PODMAN_SOCKET: &str = "/run/podman/podman.sock";

/// One socket: `--docker-host`, else `DOCKER_HOST`, else Docker's default socket when it
/// exists, else podman's when that exists, else Docker's (so the error names it). Only unix sockets are supported (`unix:///path` or a plain path).
pub(crate) fn socket_path(flag: Option<&str>) -> Result<PathBuf, String> {
    match given_socket(flag) {
        Some(given) => given,
        None => Ok(default_socket(|p| std::path::Path::new(p).exists())),
    }
}

/// Every socket to follow: each `--docker-host` (repeatable), else `DOCKER_HOST`, else both
/// Docker's and podman's default sockets that exist (Docker's when neither does, so the warning
/// names it). Each user's rootless podman socket is followed through [`appear`], which also
/// sends those present at start.
pub(crate) fn socket_paths(flags: &[String]) -> Result<Vec<PathBuf>, String> {
    if !flags.is_empty() {
        return flags.iter().map(|f| socket_path(Some(f))).collect();
    }
    match given_socket(None) {
        Some(given) => Ok(vec![given?]),
        None => Ok(default_sockets(Path::new(PODMAN_SOCKET), |p| p.exists())),
    }
}

/// What the daemon follows: the sockets to follow from the start, and the run directory to
/// watch for podman sockets made later. Without `--docker-host` and `DOCKER_HOST`: Docker's and
/// podman's sockets that exist (podman's under `run_dir`, default /run), and `run_dir` watched.
/// With them: the sockets they name, and `run_dir` watched only when given.
pub(crate) fn socket_plan(
    flags: &[String],
    run_dir: Option<&Path>,
) -> Result<(Vec<PathBuf>, Option<appear::Places>), String> {
    let named = !flags.is_empty() || given_socket(None).is_some();
    let places = appear::Places::new(run_dir.unwrap_or(Path::new(appear::DEFAULT_RUN_DIR)));
    let sockets =
        if named { socket_paths(flags)? } else { default_sockets(&places.rootful(), |p| p.exists()) };
    let watched = (run_dir.is_some() || !named).then_some(places);
    Ok((sockets, watched))
}

/// Docker's default socket and podman's (`podman`), those that `exists`; Docker's when neither
/// does.
fn default_sockets(podman: &Path, exists: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let found: Vec<PathBuf> =
        [Path::new(DEFAULT_SOCKET), podman].into_iter().filter(|p| exists(p)).map(PathBuf::from).collect();
    if found.is_empty() { vec![PathBuf::from(DEFAULT_SOCKET)] } else { found }
}

/// Docker's socket alone: `--docker-host`, else `DOCKER_HOST`, else the default (doctor's
/// docker line, which probes podman's socket on a line of its own).
pub(crate) fn docker_socket_path(flag: Option<&str>) -> Result<PathBuf, String> {
    given_socket(flag).unwrap_or_else(|| Ok(PathBuf::from(DEFAULT_SOCKET)))
}

/// The socket `--docker-host` or `DOCKER_HOST` names, if either does.
fn given_socket(flag: Option<&str>) -> Option<Result<PathBuf, String>> {
    let env = std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty());
    let (value, from) = match (flag, env.as_deref()) {
        (Some(f), _) => (f, "--docker-host"),
        (None, Some(e)) => (e, "DOCKER_HOST"),
        (None, None) => return None,
    };
    Some(parse_host(value).ok_or_else(|| {
        format!(
            "{from}={value}: bindtrace talks to the Docker API over a unix socket only \
             (unix:///var/run/docker.sock or a path); it must run on the Docker host anyway"
        )
    }))
}

/// Docker's socket, else podman's, by which of them `exists`.
fn default_socket(exists: impl Fn(&str) -> bool) -> PathBuf {
    if !exists(DEFAULT_SOCKET) && exists(PODMAN_SOCKET) {
        return PathBuf::from(PODMAN_SOCKET);
    }
    PathBuf::from(DEFAULT_SOCKET)
}

/// Which engine answers on the API socket: podman's compatible API says so in `/version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Runtime {
    #[default]
    Docker,
    Podman,
    /// Read from containerd's state files (nerdctl containers, Kubernetes pods, bare `ctr`),
    /// not an API: see `sources/containerd/`.
    Containerd,
}

impl Runtime {
    /// As reports and `bindtrace check` names spell it (`docker:NAME`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Podman => "podman",
            Runtime::Containerd => "containerd",
        }
    }

    /// How log lines name it.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Runtime::Docker => "Docker",
            Runtime::Podman => "podman",
            Runtime::Containerd => "containerd",
        }
    }

    /// Which source names a namespace several of them report (lower wins): an engine's API
    /// says most (names, published ports), containerd's state files less.
    fn rank(self) -> u8 {
        match self {
            Runtime::Docker | Runtime::Podman => 0,
            Runtime::Containerd => 1,
        }
    }
}

fn parse_host(value: &str) -> Option<PathBuf> {
    if let Some(path) = value.strip_prefix("unix://") {
        return (!path.is_empty()).then(|| PathBuf::from(path));
    }
    (!value.contains("://")).then(|| PathBuf::from(value))
}

/// A container's address on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// Network name (`bridge`, or a user-defined network).
    pub(crate) network: String,
    pub(crate) network_id: String,
    pub(crate) ipv4: Option<Ipv4Addr>,
    pub(crate) ipv6: Option<Ipv6Addr>,
}

/// One host address a container port is published on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Binding {
    pub(crate) host_ip: IpAddr,
    pub(crate) host_port: u16,
}

/// A container port and where the host publishes it (empty when exposed but not published).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortMapping {
    pub(crate) container_port: u16,
    pub(crate) proto: String,
    pub(crate) bindings: Vec<Binding>,
}

impl PortMapping {
    /// The protocol as the reports spell it (`udp`, else `tcp`: [`Container::published`] keeps
    /// only those two).
    pub(crate) fn proto_str(&self) -> &'static str {
        if self.proto == "udp" { "udp" } else { "tcp" }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Container {
    pub(crate) runtime: Runtime,
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) image: String,
    pub(crate) compose_project: Option<String>,
    pub(crate) compose_service: Option<String>,
    /// The Kubernetes pod and its namespace, when the workload is one (from the kubelet's
    /// annotations); None for every other workload.
    pub(crate) pod: Option<String>,
    pub(crate) namespace: Option<String>,
    /// The pid of its engine when that engine runs rootless, in a user namespace of its own
    /// (rootless Docker's dockerd inside RootlessKit, a user's podman service): its network
    /// namespace is where the container's bridge and veth live. None for a rootful engine.
    pub(crate) rootless_daemon: Option<u32>,
    pub(crate) running: bool,
    /// Main process, host pid namespace (0 when not running).
    pub(crate) pid: u32,
    pub(crate) started_at: Option<SystemTime>,
    /// `NetworkSettings.SandboxKey`: the namespace handle under /run/docker/netns.
    pub(crate) sandbox_key: Option<PathBuf>,
    /// `HostConfig.NetworkMode`: `default`, `bridge`, a network name, `host`, `container:ID`.
    pub(crate) network_mode: String,
    /// Inodes of the container's network namespace, through the sandbox handle and through
    /// `/proc/PID/ns/net` (normally the same one).
    pub(crate) netns_inodes: Vec<u64>,
    pub(crate) networks: Vec<Endpoint>,
    pub(crate) ports: Vec<PortMapping>,
}

impl Container {
    pub(crate) fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }

    pub(crate) fn port(&self, container_port: u16, proto: &str) -> Option<&PortMapping> {
        self.ports.iter().find(|p| p.container_port == container_port && p.proto == proto)
    }

    /// Published TCP and UDP ports (those with at least one host binding; SCTP is not
    /// audited: nothing reports its refusals).
    pub(crate) fn published(&self) -> impl Iterator<Item = &PortMapping> {
        self.ports.iter().filter(|p| (p.proto == "tcp" || p.proto == "udp") && !p.bindings.is_empty())
    }

    /// The address forwarded connections arrive at: the first IPv4 address, else IPv6.
    pub(crate) fn address(&self) -> Option<IpAddr> {
        self.networks
            .iter()
            .find_map(|e| e.ipv4.map(IpAddr::V4))
            .or_else(|| self.networks.iter().find_map(|e| e.ipv6.map(IpAddr::V6)))
    }

    /// The address connections forwarded through binding `b` arrive at: a binding on an IPv4
    /// host address reaches the container's IPv4 address; one on an IPv6 host address its IPv6
    /// address (docker-proxy and ip6tables forward IPv6 to IPv6), or its IPv4 address when it
    /// has none.
    pub(crate) fn target_of(&self, b: &Binding) -> Option<IpAddr> {
        let v4 = self.networks.iter().find_map(|e| e.ipv4.map(IpAddr::V4));
        let v6 = self.networks.iter().find_map(|e| e.ipv6.map(IpAddr::V6));
        if b.host_ip.is_ipv6() { v6.or(v4) } else { v4 }
    }

    /// The addresses connections forwarded to `m` arrive at ([`Container::target_of`]), once
    /// each: one per address family it is published on. Empty when the container has none.
    pub(crate) fn targets(&self, m: &PortMapping) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for t in m.bindings.iter().filter_map(|b| self.target_of(b)) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Whether connections to its published ports arrive on its namespace's `lo`: rootless
    /// podman's slirp4netns network (`NetworkMode` `slirp4netns`, or with options after a
    /// colon), whose default port handler, rootlessport, dials the container's own address from
    /// inside its namespace. (With `port_handler=slirp4netns` they come in on tap0 instead,
    /// from 10.0.2.2: not watched yet.)
    pub(crate) fn forwards_over_loopback(&self) -> bool {
        let slirp = self.network_mode == "slirp4netns" || self.network_mode.starts_with("slirp4netns:");
        self.runtime == Runtime::Podman
            && slirp
            && !self.network_mode.contains("port_handler=slirp4netns")
            && self.published().next().is_some()
    }

    /// A rootless engine's SandboxKey is a bind mount in its own mount namespace (an empty
    /// file seen from ours): the namespace behind it, opened through the daemon's root.
    fn add_inode_inside(&mut self, daemon_pid: u32) {
        let Some(key) = &self.sandbox_key else { return };
        if let Some(ino) = api::nsfs_inode(&format!("/proc/{daemon_pid}/root{}", key.display()))
            && !self.netns_inodes.contains(&ino)
        {
            self.netns_inodes.push(ino);
        }
    }

    /// Whether the container has a network namespace of its own (not `host`, not another
    /// container's).
    pub(crate) fn owns_netns(&self) -> bool {
        self.network_mode != "host" && !self.network_mode.starts_with("container:")
    }
}

/// Whether process `pid` (host pid namespace) runs in the network namespace with `inode`.
fn still_in(pid: u32, inode: u64) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    pid != 0 && std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode)
}

/// A Docker network; `bridge` is the Linux bridge of a bridge-driver network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Network {
    pub(crate) id: String,
    pub(crate) bridge: Option<String>,
}

/// What the daemon said last: running containers and networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Inventory {
    /// The engine behind the socket (read from `/version` at each connection).
    pub(crate) runtime: Runtime,
    pub(crate) containers: BTreeMap<String, Arc<Container>>,
    pub(crate) networks: BTreeMap<String, Network>,
    /// The daemon answering on the socket, to recognise its own proxy processes.
    pub(crate) daemon: Option<daemon::Daemon>,
    /// The daemon is unreachable and this is what it said last: containers may have gone since,
    /// and the kernel hands a freed namespace's inode to the next namespace made.
    pub(crate) stale: bool,
    /// Merged from several engines while one of them has not answered yet.
    pub(crate) pending: bool,
    /// Running containers whose inspect timed out: read again with backoff (`watch`), and
    /// meanwhile reported by namespace and address only.
    pub(crate) unread: BTreeSet<String>,
}

impl Inventory {
    /// Several engines' inventories as one: their containers and networks side by side (ids do
    /// not collide across engines), Docker's daemon first (the only one with a userland proxy),
    /// stale when any part is.
    pub(crate) fn merged<'a>(parts: impl IntoIterator<Item = &'a Inventory>) -> Inventory {
        let mut out = Inventory::default();
        for inv in parts {
            out.containers.extend(inv.containers.iter().map(|(k, v)| (k.clone(), v.clone())));
            out.networks.extend(inv.networks.iter().map(|(k, v)| (k.clone(), v.clone())));
            if out.daemon.is_none() {
                out.daemon = inv.daemon.clone();
            }
            out.stale |= inv.stale;
            out.unread.extend(inv.unread.iter().cloned());
        }
        out
    }

    /// The container whose network namespace has this inode. When several share it
    /// (`--network container:X`), the one that owns it; when several sources report it (Docker's
    /// API and containerd's state files), the one that says most ([`Runtime::rank`]).
    /// From a stale inventory, only a container whose main process still runs in that
    /// namespace: a namespace with a dead container's inode is not named after it.
    pub(crate) fn by_netns(&self, inode: u64) -> Option<&Arc<Container>> {
        self.containers
            .values()
            .filter(|c| c.netns_inodes.contains(&inode))
            .filter(|c| !self.stale || still_in(c.pid, inode))
            .min_by_key(|c| (c.runtime.rank(), !c.owns_netns()))
    }

    /// The same containers, marked as what the daemon said last (see [`Inventory::stale`]).
    pub(crate) fn as_stale(&self) -> Inventory {
        Inventory { stale: true, ..self.clone() }
    }

    /// Bridges of every bridge-driver network, sorted.
    pub(crate) fn bridges(&self) -> Vec<String> {
        let mut names: Vec<String> = self.networks.values().filter_map(|n| n.bridge.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// One complete read of the daemon's state.
pub(crate) async fn snapshot(client: &Client) -> Result<Inventory, DockerError> {
    let version: api::VersionJson = client.get_json("/version").await?;
    let mut inv = Inventory {
        runtime: version.runtime(),
        daemon: daemon::Daemon::behind(client.socket()).await,
        ..Default::default()
    };
    refresh_networks(client, &mut inv).await?;
    let list: Vec<api::ContainerSummary> = client.get_json("/containers/json").await?;
    for c in list {
        refresh_container(client, &mut inv, &c.id).await?;
    }
    Ok(inv)
}

pub(crate) async fn refresh_networks(client: &Client, inv: &mut Inventory) -> Result<(), DockerError> {
    inv.networks = match inv.runtime {
        Runtime::Docker => {
            let list: Vec<api::NetworkJson> = client.get_json("/networks").await?;
            list.iter().map(|n| (n.id.clone(), Network::from(n))).collect()
        }
        // podman's compatible `/networks` names no bridge (empty Options): its own endpoint
        // does. The libpod API needs a version prefix; 4.0.0 is the oldest it serves.
        Runtime::Podman => {
            let list: Vec<api::LibpodNetworkJson> = client.get_json("/v4.0.0/libpod/networks/json").await?;
            list.iter().map(|n| (n.id.clone(), Network::from(n))).collect()
        }
        // Not an API: containerd's networks are its workloads' own (sources/containerd).
        Runtime::Containerd => BTreeMap::new(),
    };
    Ok(())
}

/// Re-reads one container: kept when running, dropped when stopped or gone.
pub(crate) async fn refresh_container(
    client: &Client,
    inv: &mut Inventory,
    id: &str,
) -> Result<(), DockerError> {
    match client.get_json::<api::ContainerJson>(&format!("/containers/{}/json", http::encode_query(id))).await
    {
        Ok(json) => {
            inv.unread.remove(id);
            let mut c = json.into_container(inv.runtime);
            if let Some(daemon) = inv.daemon.as_ref().filter(|d| d.rootless()) {
                c.rootless_daemon = Some(daemon.pid);
                c.add_inode_inside(daemon.pid);
            }
            if c.running {
                inv.containers.insert(c.id.clone(), Arc::new(c));
            } else {
                inv.containers.remove(&c.id);
            }
            Ok(())
        }
        Err(e) if e.is_not_found() => {
            inv.unread.remove(id);
            inv.containers.retain(|cid, _| !cid.starts_with(id));
            Ok(())
        }
        // One container the daemon cannot describe in time (dockerd answers an inspect only
        // once it has the container's lock, which a stop or removal in progress holds) is not
        // the daemon being away: the others are read, and this one again later (at its next
        // event, or by the watcher's backoff over `unread`, whichever comes first). Failing the
        // whole read made one stuck container keep the API "unavailable" for as long as it
        // stayed stuck (the soak's relay restarts showed it: every retry's read hung on the
        // same inspect).
        Err(e @ DockerError::Timeout { .. }) => {
            log::debug!("{e}: that container is read again later");
            inv.unread.insert(id.to_string());
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container whose inspect the daemon does not answer (it waits on that container's
    /// lock) is skipped, not taken for the daemon being away: the read goes on.
    #[test]
    fn an_inspect_that_times_out_is_not_the_daemon_away() {
        let dir = std::env::temp_dir().join(format!("bindtrace-stuck-inspect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            // Accepts and never answers; time, paused, runs to the request timeout at once.
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = listener.accept().await {
                    held.push(s);
                }
            });
            let client = Client::new(&path);
            let mut inv = Inventory::default();
            refresh_container(&client, &mut inv, "abc").await.expect("one stuck container is not an outage");
            assert!(inv.containers.is_empty());
            assert!(inv.unread.contains("abc"), "kept to be read again: {:?}", inv.unread);
            let stuck = client.get_json::<api::ContainerJson>("/containers/abc/json").await.unwrap_err();
            assert!(matches!(stuck, DockerError::Timeout { .. }), "{stuck}");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn docker_host_forms() {
        assert_eq!(
            parse_host("unix:///run/user/1000/docker.sock"),
            Some("/run/user/1000/docker.sock".into())
        );
        assert_eq!(parse_host("/tmp/relay.sock"), Some("/tmp/relay.sock".into()));
        assert_eq!(parse_host("tcp://10.0.0.1:2375"), None);
        assert_eq!(parse_host("unix://"), None);
        assert!(socket_path(Some("tcp://x:1")).unwrap_err().contains("unix socket"));
        assert_eq!(socket_path(Some("/a.sock")).unwrap(), PathBuf::from("/a.sock"));
    }

    #[test]
    fn both_default_sockets_when_both_exist() {
        let both = vec![PathBuf::from(DEFAULT_SOCKET), PathBuf::from(PODMAN_SOCKET)];
        let podman = Path::new(PODMAN_SOCKET);
        assert_eq!(default_sockets(podman, |_| true), both);
        assert_eq!(default_sockets(podman, |_| false), vec![PathBuf::from(DEFAULT_SOCKET)]);
        assert_eq!(default_sockets(podman, |p| p == podman), vec![PathBuf::from(PODMAN_SOCKET)]);
        let flags = ["/a.sock".to_owned(), "unix:///b.sock".to_owned()];
        assert_eq!(socket_paths(&flags).unwrap(), vec![PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]);
        assert!(socket_paths(&["tcp://x:1".to_owned()]).is_err());
        // Named sockets are not watched for, unless a run directory is given.
        let (sockets, watched) = socket_plan(&flags, None).unwrap();
        assert_eq!((sockets.len(), watched), (2, None));
        let (_, watched) = socket_plan(&flags, Some(Path::new("/tmp/r"))).unwrap();
        assert_eq!(watched.map(|w| w.rootful()), Some(PathBuf::from("/tmp/r/podman/podman.sock")));
    }

    #[test]
    fn podman_socket_only_without_dockers() {
        assert_eq!(default_socket(|_| true), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(default_socket(|_| false), PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(default_socket(|p| p == PODMAN_SOCKET), PathBuf::from(PODMAN_SOCKET));
        assert_eq!(default_socket(|p| p == DEFAULT_SOCKET), PathBuf::from(DEFAULT_SOCKET));
    }

    fn container(id: &str, inodes: &[u64], mode: &str) -> Arc<Container> {
        Arc::new(Container {
            runtime: Runtime::Docker,
            id: id.into(),
            name: id.into(),
            image: "img".into(),
            compose_project: None,
            compose_service: None,
            pod: None,
            namespace: None,
            rootless_daemon: None,
            running: true,
            pid: 1,
            started_at: None,
            sandbox_key: None,
            network_mode: mode.into(),
            netns_inodes: inodes.to_vec(),
            networks: vec![],
            ports: vec![],
        })
    }

    #[test]
    fn namespace_owner_wins() {
        let mut inv = Inventory::default();
        inv.containers.insert("a".into(), container("a", &[5], "container:b"));
        inv.containers.insert("b".into(), container("b", &[5], "default"));
        inv.containers.insert("c".into(), container("c", &[6, 7], "default"));
        assert_eq!(inv.by_netns(5).unwrap().id, "b");
        assert_eq!(inv.by_netns(7).unwrap().id, "c");
        assert!(inv.by_netns(8).is_none());
        // containerd's state files name the same namespace as Docker's API: the API wins.
        let mut shim = (*container("0shim", &[7], "default")).clone();
        shim.runtime = Runtime::Containerd;
        inv.containers.insert("0shim".into(), Arc::new(shim));
        assert_eq!(inv.by_netns(7).unwrap().id, "c");
    }

    #[test]
    fn a_stale_inventory_names_only_containers_still_in_their_namespace() {
        use std::os::unix::fs::MetadataExt as _;
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let mut inv = Inventory::default();
        let mut alive = (*container("alive", &[own], "bridge")).clone();
        alive.pid = std::process::id();
        inv.containers.insert("alive".into(), Arc::new(alive));
        // A container that died: its pid is gone (pid_max is at most 2^22).
        let mut dead = (*container("dead", &[own + 1], "bridge")).clone();
        dead.pid = u32::MAX - 1;
        inv.containers.insert("dead".into(), Arc::new(dead));
        assert_eq!(inv.by_netns(own + 1).unwrap().id, "dead", "a fresh inventory is trusted");
        let stale = inv.as_stale();
        assert_eq!(stale.by_netns(own).unwrap().id, "alive");
        assert!(stale.by_netns(own + 1).is_none(), "a dead container's inode names no new namespace");
    }

    /// IPv6 bindings reach the container's IPv6 address (what docker-proxy -container-ip and
    /// ip6tables use), so a port published on both families is audited at both addresses.
    #[test]
    fn each_published_family_has_its_target() {
        let mut c = (*container("c", &[5], "default")).clone();
        let v4: IpAddr = "172.18.0.2".parse().unwrap();
        let v6: IpAddr = "fd00:ad71::2".parse().unwrap();
        let b = |ip: &str| Binding { host_ip: ip.parse().unwrap(), host_port: 8080 };
        let m =
            PortMapping { container_port: 80, proto: "tcp".into(), bindings: vec![b("0.0.0.0"), b("::")] };
        c.networks = vec![Endpoint {
            network: "n".into(),
            network_id: "i".into(),
            ipv4: Some("172.18.0.2".parse().unwrap()),
            ipv6: Some("fd00:ad71::2".parse().unwrap()),
        }];
        assert_eq!(c.targets(&m), vec![v4, v6]);
        // Without IPv6 in the container, docker-proxy forwards IPv6 clients to its IPv4 address.
        c.networks[0].ipv6 = None;
        assert_eq!(c.targets(&m), vec![v4]);
        let only6 = PortMapping { bindings: vec![b("::")], ..m.clone() };
        assert_eq!(c.targets(&only6), vec![v4]);
        c.networks.clear();
        assert!(c.targets(&m).is_empty());
    }
}
