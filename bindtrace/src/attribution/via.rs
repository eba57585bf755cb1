//! How a refused connection got to the container, and through which published port.
//!
//! Three sources, in this order:
//! 1. conntrack: a NATed flow whose reply tuple is the refusal's means `dnat`; its original
//!    tuple names the real client and the published address it dialed (`conntrack.rs`: a TCP
//!    flow from the destroy events kept, a UDP one asked for, as its entry outlives the refusal);
//! 2. the connect tracker: the process that connected with the refusal's 4-tuple, recorded in
//!    the kernel as it connected (`connect.rs`), keyed by the refusal's 4-tuple and namespace
//!    (networks in other namespaces may reuse the same addresses). The daemon's own proxy (recognised by its
//!    executable, parent and namespaces, `sources/docker/daemon.rs`, never by its name) means
//!    `docker-proxy`, the published port taken from the daemon's bindings; anything else is
//!    `direct`, with the process and, when it runs in one, its container;
//!    For UDP, which `inet_sock_set_state` never sees, the kernel records every UDP `connect()`
//!    to a watched prefix instead (`UDP_CONNECTORS`), and where that record is missing (not
//!    attached on this kernel, or evicted) the daemon's namespace is searched for a proxy's UDP
//!    socket still connected from the refusal's client address to its target (`udp_proxy.rs`);
//!    a rootless Docker container's own daemon's proxy (docker-proxy inside RootlessKit's
//!    namespace, run by `rootlesskit-docker-proxy`) means `rootlesskit`;
//!    on a namespace's `lo` (rootless podman, `netns/loopback.rs`), podman's own forwarder
//!    (recognised by its executable, `rootlessport.rs`) means `rootlessport`;
//! 3. Docker's inventory: a client address that is another container's means `direct`.
//!
//! Otherwise `via` stays unknown rather than guessed.
use std::net::{IpAddr, SocketAddr};

use bindtrace_common::LOOPBACK_IFINDEX;

use crate::{
    attribution::{
        connect::{ConnectTracker, ConnectorInfo, UdpConnects},
        rootlessport, udp_proxy,
    },
    diagnose::procfs::{self, Holder},
    diagnose::report::{
        ClientProcess, ContainerRef, ContainerReport, DockerContext, OriginalTuple, Report, Via,
    },
    sources::conntrack::{self, Conntrack, NatFlow},
    sources::docker::{Binding, Container, Inventory, daemon::Daemon},
};

/// What a UDP line's own lookups found: conntrack's entry (asked for with a ctnetlink query)
/// and docker-proxy's connected socket (entering the daemon's namespace, a sock_diag dump, a
/// /proc walk). They take as long as the host makes them, so the enrichment worker makes them,
/// once per line, next to the line's diagnosis (`app/enrichment.rs`); the loop only reads the
/// result. A line the queue had no room for has none (its `via` stays unknown).
#[derive(Debug, Clone, Default)]
pub(crate) struct UdpLookups {
    flow: Option<NatFlow>,
    proxy: Option<(Holder, u64)>,
    /// The kernel's record of who connected the sending socket, when it is not the daemon's
    /// proxy (a host process, or a container's).
    other: Option<ConnectorInfo>,
}

/// What the UDP lookups need: the daemon whose proxy may have sent the datagram, and whether
/// conntrack is followed at all.
#[derive(Debug, Clone, Default)]
pub(crate) struct UdpSources {
    pub(crate) daemon: Option<Daemon>,
    pub(crate) conntrack: bool,
    /// The namespaces whose conntrack table NATs into a refused namespace other than the host's
    /// (RootlessKit's, for a rootless daemon's containers), by the refused namespace's cookie.
    pub(crate) tables: std::collections::HashMap<u64, std::sync::Arc<crate::netns::Netns>>,
    /// The kernel's record of UDP connects (None where it is not attached).
    pub(crate) connects: Option<UdpConnects>,
}

/// Makes the UDP lookups for `report` (nothing for a TCP line, or one without its addresses).
pub(crate) fn udp_lookups(report: &Report, sources: &UdpSources) -> UdpLookups {
    let (Some(client_ip), Some(client_port), Some(target_ip)) =
        (report.client_ip, report.client_port, report.target_ip)
    else {
        return UdpLookups::default();
    };
    if report.proto != "udp" {
        return UdpLookups::default();
    }
    let (client, target) =
        (SocketAddr::new(client_ip, client_port), SocketAddr::new(target_ip, report.target_port));
    let flow = if sources.conntrack {
        udp_flow(sources.tables.get(&report.netns_cookie), target, client)
    } else {
        None
    };
    if flow.is_some_and(|f| f.is_dnat()) {
        return UdpLookups { flow, ..Default::default() };
    }
    // The kernel's record first: docker-proxy may have closed the socket since (Docker 20.10
    // closes it at the first refusal), and a record is one map lookup.
    let recorded = sources.connects.as_ref().and_then(|c| c.lookup_settled(client, target, report.ktime_ns));
    if let Some(who) = recorded {
        if let Some(daemon) = sources.daemon.as_ref()
            && daemon.owns_proxy(who.pid)
            && let Ok(proc) = procfs::ProcDir::open(who.pid)
        {
            return UdpLookups {
                flow,
                proxy: Some((proc.describe(), u64::from(who.netns_ino))),
                other: None,
            };
        }
        if sources.daemon.is_none() && who.comm == "docker-proxy" {
            // Calls itself the proxy, and there is no daemon to check it against: say nothing.
            return UdpLookups { flow, ..Default::default() };
        }
        // As for TCP: a recorded connector that is not the daemon's proxy is `direct`.
        return UdpLookups { flow, proxy: None, other: Some(who) };
    }
    let proxy = sources.daemon.as_ref().and_then(|d| udp_proxy::proxy_for(d, client, target));
    UdpLookups { flow, proxy, other: None }
}

/// Everything known about the connection behind `report`; a UDP line's lookups were made
/// already (`udp`), so nothing here waits on the kernel for longer than a map lookup.
pub(crate) fn docker_context(
    report: &Report,
    inventory: Option<&Inventory>,
    connect: Option<&ConnectTracker>,
    conntrack: Option<&Conntrack>,
    udp_found: &UdpLookups,
) -> DockerContext {
    let container = inventory.and_then(|inv| inv.by_netns(report.netns));
    let mut ctx =
        DockerContext { container: container.map(|c| ContainerReport::from(&**c)), ..Default::default() };
    let (Some(client_ip), Some(client_port), Some(target_ip)) =
        (report.client_ip, report.client_port, report.target_ip)
    else {
        return ctx;
    };
    let client = SocketAddr::new(client_ip, client_port);
    let target = SocketAddr::new(target_ip, report.target_port);
    let udp = report.proto == "udp";
    let bindings: &[Binding] = container
        .and_then(|c| c.port(report.target_port, report.proto))
        .map(|p| p.bindings.as_slice())
        .unwrap_or(&[]);

    let flow = if udp {
        udp_found.flow
    } else {
        conntrack.and_then(|ct| ct.flow(report.netns_cookie, target, client))
    };
    if let Some(flow) = flow
        && flow.is_dnat()
    {
        ctx.via = Some(Via::Dnat);
        ctx.original = Some(OriginalTuple {
            client_ip: flow.orig.src.ip(),
            client_port: flow.orig.src.port(),
            target_ip: flow.orig.dst.ip(),
            target_port: flow.orig.dst.port(),
        });
        ctx.published = Some(
            binding_for(bindings, flow.orig.dst)
                .unwrap_or(Binding { host_ip: flow.orig.dst.ip(), host_port: flow.orig.dst.port() }),
        );
        return ctx;
    }

    if udp && let Some((proxy, netns)) = udp_found.proxy.clone() {
        ctx.via = Some(Via::DockerProxy);
        ctx.published = parse_proxy_args(&proxy.argv)
            .and_then(|b| binding_for(bindings, SocketAddr::new(b.host_ip, b.host_port)))
            .or_else(|| single(bindings));
        ctx.client_netns = Some(netns);
        ctx.client_process = Some(ClientProcess { pid: proxy.pid, comm: proxy.comm });
        return ctx;
    }

    if udp
        && report.ifindex != LOOPBACK_IFINDEX
        && let Some(who) = udp_found.other.clone()
    {
        // Checked on the worker already: not the daemon's proxy.
        ctx.via = Some(Via::Direct);
        ctx.client_container =
            inventory.and_then(|inv| inv.by_netns(u64::from(who.netns_ino))).map(|c| container_ref(c));
        ctx.client_netns = Some(u64::from(who.netns_ino));
        ctx.client_process = Some(ClientProcess { pid: who.pid, comm: who.comm });
        return ctx;
    }

    if let Some(who) = connect.filter(|_| !udp).and_then(|c| c.lookup(report.netns_cookie, client, target)) {
        if report.ifindex == LOOPBACK_IFINDEX
            && u64::from(who.netns_ino) == report.netns
            && rootlessport::is_forwarder(who.pid, report.netns)
        {
            // One forwarder serves every binding of the port: which one was dialed is not in
            // what it dials, so only a port published once says.
            ctx.via = Some(Via::Rootlessport);
            ctx.published = single(bindings);
            ctx.client_netns = Some(u64::from(who.netns_ino));
            ctx.client_process = Some(ClientProcess { pid: who.pid, comm: rootlessport::NAME.to_owned() });
            return ctx;
        }
        // A rootless engine's container: its own daemon (inside RootlessKit) runs the proxy.
        let rootless = container.and_then(|c| c.rootless_daemon).and_then(|pid| Daemon::of(pid).ok());
        if rootless.is_some_and(|d| d.owns_proxy(who.pid)) {
            ctx.via = Some(Via::Rootlesskit);
            // It listens on the loopback of RootlessKit's namespace, whatever the binding: the
            // published port picks the binding (`binding_for` prefers the wildcard one).
            ctx.published = proxy_binding(who.pid)
                .and_then(|b| binding_for(bindings, SocketAddr::new(b.host_ip, b.host_port)))
                .or_else(|| single(bindings));
            ctx.client_netns = Some(u64::from(who.netns_ino));
            ctx.client_process = Some(ClientProcess { pid: who.pid, comm: who.comm });
            return ctx;
        }
        let daemon = inventory.and_then(|inv| inv.daemon.as_ref());
        if daemon.is_none() && who.comm == "docker-proxy" {
            // Calls itself the proxy, and the daemon is not known to check it against (not
            // reachable, or outside our pid namespace): say nothing rather than guess.
            return ctx;
        }
        if daemon.is_some_and(|d| d.owns_proxy(who.pid)) {
            ctx.via = Some(Via::DockerProxy);
            // The daemon's bindings say what is published; the proxy's own arguments only pick
            // which of them when the port is published more than once.
            let serves = proxy_binding(who.pid);
            ctx.published = serves
                .and_then(|b| binding_for(bindings, SocketAddr::new(b.host_ip, b.host_port)))
                .or_else(|| single(bindings));
        } else {
            ctx.via = Some(Via::Direct);
            ctx.client_container =
                inventory.and_then(|inv| inv.by_netns(u64::from(who.netns_ino))).map(|c| container_ref(c));
        }
        ctx.client_netns = Some(u64::from(who.netns_ino));
        ctx.client_process = Some(ClientProcess { pid: who.pid, comm: who.comm });
        return ctx;
    }

    // No process recorded, but the source is another container's address.
    if let Some(other) = inventory.and_then(|inv| container_with_ip(inv, client_ip))
        && container.is_none_or(|c| c.id != other.id)
    {
        ctx.via = Some(Via::Direct);
        ctx.client_container = Some(container_ref(other));
    }
    ctx
}

/// conntrack's UDP entry for the refusal, asked for in the namespace whose table NATs into the
/// refused one: `table` (RootlessKit's), else this one (the host's, where Docker DNATs); a
/// failed query is logged and leaves `via` to the other sources.
fn udp_flow(
    table: Option<&std::sync::Arc<crate::netns::Netns>>,
    target: SocketAddr,
    client: SocketAddr,
) -> Option<NatFlow> {
    let found = match table {
        Some(ns) => ns.run(|| conntrack::udp_flow(target, client)),
        None => conntrack::udp_flow(target, client),
    };
    found.map_err(|e| log::debug!("conntrack query for {client} -> {target}: {e}")).ok()?
}

fn container_ref(c: &Container) -> ContainerRef {
    ContainerRef { id: c.short_id().to_owned(), name: c.name.clone() }
}

fn container_with_ip(inv: &Inventory, ip: IpAddr) -> Option<&Container> {
    inv.containers
        .values()
        .find(|c| {
            c.networks
                .iter()
                .any(|e| e.ipv4.map(IpAddr::V4) == Some(ip) || e.ipv6.map(IpAddr::V6) == Some(ip))
        })
        .map(|c| &**c)
}

/// The binding a connection to `dialed` used: same port, and the same address or a wildcard.
fn binding_for(bindings: &[Binding], dialed: SocketAddr) -> Option<Binding> {
    let port = bindings.iter().filter(|b| b.host_port == dialed.port());
    let mut port: Vec<&Binding> = port.collect();
    port.sort_by_key(|b| {
        (b.host_ip != dialed.ip(), !b.host_ip.is_unspecified(), b.host_ip.is_ipv4() != dialed.is_ipv4())
    });
    port.first().map(|b| **b)
}

fn single(bindings: &[Binding]) -> Option<Binding> {
    match bindings {
        [one] => Some(*one),
        _ => None,
    }
}

/// The host address a docker-proxy process serves, from its command line
/// (`-host-ip 0.0.0.0 -host-port 8000 -container-ip 172.17.0.2 -container-port 8000`).
fn proxy_binding(pid: u32) -> Option<Binding> {
    parse_proxy_args(&procfs::argv_of(pid))
}

fn parse_proxy_args(argv: &[String]) -> Option<Binding> {
    let mut host_ip = None;
    let mut host_port = None;
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        // Go's flag package: -flag value, --flag value, -flag=value.
        let flag = arg.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (flag, None),
        };
        let mut value = || inline.clone().or_else(|| args.next().cloned());
        match name {
            "host-ip" => host_ip = value().and_then(|v| v.parse::<IpAddr>().ok()),
            "host-port" => host_port = value().and_then(|v| v.parse::<u16>().ok()),
            _ => {}
        }
    }
    Some(Binding { host_ip: host_ip?, host_port: host_port? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    fn udp_report() -> Report {
        Report {
            time: String::new(),
            ktime_ns: None,
            event: "refused",
            verdict: crate::diagnose::verdict::Verdict::LoopbackOnly,
            undiagnosed: None,
            proto: "udp",
            family: "ipv4",
            target_ip: Some("172.17.0.2".parse().unwrap()),
            target_port: 53,
            client_ip: Some("172.17.0.1".parse().unwrap()),
            client_port: Some(40000),
            netns: 7,
            netns_cookie: 7,
            bridge: "docker0".into(),
            ifindex: 2,
            veth: String::new(),
            hook: "kfree-skb",
            listeners: vec![],
            listeners_omitted: 0,
            count: Some(1),
            count_unknown: None,
            count_at_least: false,
            hint: String::new(),
            docker: Default::default(),
        }
    }

    /// A UDP line's `via` comes from the lookups the worker made, and from nothing else: the
    /// loop makes no query of its own for it (with nothing found, `via` stays unknown).
    #[test]
    fn a_udp_line_reads_the_lookups_it_was_given() {
        let report = udp_report();
        let flow = NatFlow {
            orig: conntrack::Tuple {
                src: "10.9.0.5:41000".parse().unwrap(),
                dst: "10.9.0.1:5353".parse().unwrap(),
            },
            reply: conntrack::Tuple {
                src: "172.17.0.2:53".parse().unwrap(),
                dst: "172.17.0.1:40000".parse().unwrap(),
            },
        };
        let found = UdpLookups { flow: Some(flow), ..Default::default() };
        let ctx = docker_context(&report, None, None, None, &found);
        assert_eq!(ctx.via, Some(Via::Dnat));
        let original = ctx.original.expect("the original tuple");
        assert_eq!((original.client_port, original.target_port), (41000, 5353));
        assert_eq!(ctx.published.map(|b| b.host_port), Some(5353));
        let ctx = docker_context(&report, None, None, None, &UdpLookups::default());
        assert_eq!(ctx.via, None);
        // A TCP line makes none: its flow is the destroy events' (none here).
        let sources =
            UdpSources { daemon: None, conntrack: true, connects: None, tables: Default::default() };
        assert!(udp_lookups(&Report { proto: "tcp", ..udp_report() }, &sources).flow.is_none());
    }

    #[test]
    fn proxy_command_lines() {
        let b = parse_proxy_args(&argv(
            "/usr/sbin/docker-proxy -proto tcp -host-ip :: -host-port 8000 -container-ip 172.17.0.2 -container-port 8000",
        ))
        .unwrap();
        assert_eq!(b, Binding { host_ip: "::".parse().unwrap(), host_port: 8000 });
        let b = parse_proxy_args(&argv("docker-proxy --host-ip=127.0.0.1 --host-port=18000")).unwrap();
        assert_eq!(b.host_port, 18000);
        assert_eq!(parse_proxy_args(&argv("docker-proxy -proto tcp")), None);
    }

    #[test]
    fn the_binding_the_connection_used() {
        let v4 = Binding { host_ip: "0.0.0.0".parse().unwrap(), host_port: 8000 };
        let v6 = Binding { host_ip: "::".parse().unwrap(), host_port: 8000 };
        let other = Binding { host_ip: "0.0.0.0".parse().unwrap(), host_port: 9000 };
        let local = Binding { host_ip: "10.9.0.1".parse().unwrap(), host_port: 9000 };
        let all = [v4, v6, other, local];
        assert_eq!(binding_for(&all, "10.9.0.1:8000".parse().unwrap()), Some(v4));
        assert_eq!(binding_for(&all, "[fd00::1]:8000".parse().unwrap()), Some(v6));
        assert_eq!(binding_for(&all, "10.9.0.1:9000".parse().unwrap()), Some(local));
        assert_eq!(binding_for(&all, "10.9.0.1:7000".parse().unwrap()), None);
    }
}
