//! One output record: a refusal (or a folded run of them) with everything that explains it.
use std::net::IpAddr;

use serde::Serialize;

use crate::{diagnose::procfs::Holder, diagnose::verdict::Verdict, sources::docker::Binding};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ListenerReport {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    /// At most [`bounds::HOLDERS`](crate::bounds::HOLDERS), lowest pids first.
    pub(crate) pids: Vec<Holder>,
    /// Holders of the socket not listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) pids_omitted: usize,
}

pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The JSON line, field for field; the text line is rendered from it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// RFC 3339, when bindtrace wrote the line.
    pub(crate) time: String,
    /// Kernel monotonic time of the sampled refusal (absent when every sample was lost).
    pub(crate) ktime_ns: Option<u64>,
    pub(crate) event: &'static str,
    pub(crate) verdict: Verdict,
    /// Why the verdict is `unknown` (see `diagnose::enrich::Undiagnosed`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) undiagnosed: Option<&'static str>,
    pub(crate) proto: &'static str,
    pub(crate) family: &'static str,
    pub(crate) target_ip: Option<IpAddr>,
    pub(crate) target_port: u16,
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) client_port: Option<u16>,
    /// Namespace inode (as `ls -l /proc/PID/ns/net` shows it) and cookie.
    pub(crate) netns: u64,
    pub(crate) netns_cookie: u64,
    /// null for a routed veth without a bridge (a /32 route to the workload, as Calico does).
    #[serde(serialize_with = "empty_as_null")]
    pub(crate) bridge: String,
    /// Container-side interface index and host-side veth name (null on a namespace's `lo`,
    /// which has no veth: rootless podman's forwarder).
    pub(crate) ifindex: u32,
    #[serde(serialize_with = "empty_as_null")]
    pub(crate) veth: String,
    pub(crate) hook: &'static str,
    pub(crate) listeners: Vec<ListenerReport>,
    /// Listeners not listed (beyond [`bounds::LISTENERS`](crate::bounds::LISTENERS)).
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) listeners_omitted: usize,
    /// Refusals this line stands for (exact: from the kernel's counters); null when the
    /// refusal found the count map full (then `count_unknown` says so).
    pub(crate) count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) count_unknown: Option<CountUnknown>,
    /// `count` is a lower bound: UDP on the tc hook, which counts the ICMP port unreachables
    /// the container sent, and the kernel rate-limits those (absent when the count is exact).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) count_at_least: bool,
    pub(crate) hint: String,
    /// Which container, which published port, how the connection got there.
    #[serde(flatten)]
    pub(crate) docker: DockerContext,
}

/// Why a line has no count: the refusal found the kernel's count map full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct CountUnknown {
    /// `map_full`.
    pub(crate) reason: &'static str,
    /// Refusals counted only in the overflow total, since `since` (exact).
    pub(crate) overflowed: u64,
    /// RFC 3339: when the first refusal found the map full.
    pub(crate) since: String,
}

/// The Docker side of a refusal (every field null when unknown: no Docker, or not a container).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DockerContext {
    pub(crate) container: Option<ContainerReport>,
    /// The host address the connection was published through (for `direct`, none).
    pub(crate) published: Option<Binding>,
    pub(crate) via: Option<Via>,
    /// The process that connected, when it ran on this host (docker-proxy, a host process,
    /// another container's process).
    pub(crate) client_process: Option<ClientProcess>,
    /// The container the connection came from, when it came from one.
    pub(crate) client_container: Option<ContainerRef>,
    /// For `dnat`: the connection as the client sent it, before translation.
    pub(crate) original: Option<OriginalTuple>,
    /// Network namespace inode of the connecting process, when it was recorded.
    #[serde(skip)]
    pub(crate) client_netns: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ContainerReport {
    /// The engine that runs it: `docker`, `podman` or `containerd`.
    pub(crate) runtime: crate::sources::docker::Runtime,
    /// Short id (12 hex digits).
    pub(crate) id: String,
    pub(crate) name: String,
    /// null when the source does not say (containerd's state files name no image for a bare
    /// `ctr run`).
    #[serde(serialize_with = "empty_as_null")]
    pub(crate) image: String,
    pub(crate) compose_project: Option<String>,
    pub(crate) compose_service: Option<String>,
    /// The Kubernetes pod and its namespace (from the kubelet's annotations); null otherwise.
    pub(crate) pod: Option<String>,
    pub(crate) namespace: Option<String>,
    /// Whether its engine runs rootless (in a user namespace of its own: rootless Docker
    /// inside RootlessKit, a user's podman); `runtime` still says which engine.
    pub(crate) rootless: bool,
}

/// An empty string as JSON null: the field's "unknown".
pub(crate) fn empty_as_null<S: serde::Serializer>(s: &str, ser: S) -> Result<S::Ok, S::Error> {
    if s.is_empty() { ser.serialize_none() } else { ser.serialize_str(s) }
}

impl From<&crate::sources::docker::Container> for ContainerReport {
    fn from(c: &crate::sources::docker::Container) -> Self {
        ContainerReport {
            runtime: c.runtime,
            id: c.short_id().to_owned(),
            name: c.name.clone(),
            image: c.image.clone(),
            compose_project: c.compose_project.clone(),
            compose_service: c.compose_service.clone(),
            pod: c.pod.clone(),
            namespace: c.namespace.clone(),
            rootless: c.rootless_daemon.is_some(),
        }
    }
}

/// How a refused connection reached the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Via {
    /// Docker's userland proxy accepted on the host and dialed the container.
    #[serde(rename = "docker-proxy")]
    DockerProxy,
    /// Destination NAT of a published port (another machine, or the proxy off).
    #[serde(rename = "dnat")]
    Dnat,
    /// Straight to the container's address (a host process or another container).
    #[serde(rename = "direct")]
    Direct,
    /// Rootless podman's port forwarder, which accepted on the host and dialed the container's
    /// own address from inside its namespace (over its `lo`).
    #[serde(rename = "rootlessport")]
    Rootlessport,
    /// Rootless Docker: RootlessKit's port driver accepted on the host, and docker-proxy
    /// inside RootlessKit's namespace dialed the container (`client_process`).
    #[serde(rename = "rootlesskit")]
    Rootlesskit,
}

impl Via {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Via::DockerProxy => "docker-proxy",
            Via::Dnat => "dnat",
            Via::Direct => "direct",
            Via::Rootlessport => "rootlessport",
            Via::Rootlesskit => "rootlesskit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ClientProcess {
    /// Host pid namespace.
    pub(crate) pid: u32,
    pub(crate) comm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ContainerRef {
    pub(crate) id: String,
    pub(crate) name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct OriginalTuple {
    pub(crate) client_ip: IpAddr,
    pub(crate) client_port: u16,
    /// The published address the client dialed.
    pub(crate) target_ip: IpAddr,
    pub(crate) target_port: u16,
}

/// A published port checked before anyone connects (`event: "audit"`), or a row of
/// `bindtrace check`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditReport {
    pub(crate) time: String,
    pub(crate) event: &'static str,
    /// A [`Verdict`]'s name, or `ok` (only `bindtrace check` lists healthy ports).
    pub(crate) verdict: &'static str,
    pub(crate) proto: &'static str,
    pub(crate) family: &'static str,
    /// The container address forwarded connections arrive at.
    pub(crate) target_ip: Option<IpAddr>,
    pub(crate) target_port: u16,
    pub(crate) netns: u64,
    pub(crate) container: ContainerReport,
    /// The first host binding of the port, and all of them.
    pub(crate) published: Option<Binding>,
    pub(crate) bindings: Vec<Binding>,
    pub(crate) listeners: Vec<ListenerReport>,
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) listeners_omitted: usize,
    pub(crate) hint: String,
}

/// A line about lines: what could not be delivered.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LostReport {
    pub(crate) time: String,
    pub(crate) event: &'static str,
    /// Where: `kernel_ringbuf` (samples dropped, their counts are still in the next lines), or
    /// `kernel_recursion` (hook invocations the kernel skipped: those refusals are not counted).
    pub(crate) stage: &'static str,
    pub(crate) count: u64,
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
