//! One output record: a refusal (or a folded run of them) with everything that explains it.
use std::net::IpAddr;

use serde::Serialize;

use crate::{sources::docker::Binding, diagnose::sockets::Holder, diagnose::verdict::Verdict};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerReport {
    pub ip: IpAddr,
    pub port: u16,
    pub pids: Vec<Holder>,
}

/// The JSON line, field for field; the text line is rendered from it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// RFC 3339, when bindtrace wrote the line.
    pub time: String,
    /// Kernel monotonic time of the sampled refusal (absent when every sample was lost).
    pub ktime_ns: Option<u64>,
    pub event: &'static str,
    pub verdict: Verdict,
    pub proto: &'static str,
    pub family: &'static str,
    pub target_ip: Option<IpAddr>,
    pub target_port: u16,
    pub client_ip: Option<IpAddr>,
    pub client_port: Option<u16>,
    /// Namespace inode (as `ls -l /proc/PID/ns/net` shows it) and cookie.
    pub netns: u64,
    pub netns_cookie: u64,
    pub bridge: String,
    /// Container-side interface index and host-side veth name.
    pub ifindex: u32,
    pub veth: String,
    pub hook: &'static str,
    pub listeners: Vec<ListenerReport>,
    /// Refusals this line stands for (exact: from the kernel's counters).
    pub count: u64,
    pub hint: String,
    /// Which container, which published port, how the connection got there.
    #[serde(flatten)]
    pub docker: DockerContext,
}

/// The Docker side of a refusal (every field null when unknown: no Docker, or not a container).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DockerContext {
    pub container: Option<ContainerReport>,
    /// The host address the connection was published through (for `direct`, none).
    pub published: Option<Binding>,
    pub via: Option<Via>,
    /// The process that connected, when it ran on this host (docker-proxy, a host process,
    /// another container's process).
    pub client_process: Option<ClientProcess>,
    /// The container the connection came from, when it came from one.
    pub client_container: Option<ContainerRef>,
    /// For `dnat`: the connection as the client sent it, before translation.
    pub original: Option<OriginalTuple>,
    /// Network namespace inode of the connecting process, when it was recorded.
    #[serde(skip)]
    pub client_netns: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerReport {
    /// Short id (12 hex digits).
    pub id: String,
    pub name: String,
    pub image: String,
    pub compose_project: Option<String>,
    pub compose_service: Option<String>,
}

impl From<&crate::sources::docker::Container> for ContainerReport {
    fn from(c: &crate::sources::docker::Container) -> Self {
        ContainerReport {
            id: c.short_id().to_owned(),
            name: c.name.clone(),
            image: c.image.clone(),
            compose_project: c.compose_project.clone(),
            compose_service: c.compose_service.clone(),
        }
    }
}

/// How a refused connection reached the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Via {
    /// Docker's userland proxy accepted on the host and dialed the container.
    #[serde(rename = "docker-proxy")]
    DockerProxy,
    /// Destination NAT of a published port (another machine, or the proxy off).
    #[serde(rename = "dnat")]
    Dnat,
    /// Straight to the container's address (a host process or another container).
    #[serde(rename = "direct")]
    Direct,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::DockerProxy => "docker-proxy",
            Via::Dnat => "dnat",
            Via::Direct => "direct",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientProcess {
    /// Host pid namespace.
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OriginalTuple {
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The published address the client dialed.
    pub target_ip: IpAddr,
    pub target_port: u16,
}

/// A published port checked before anyone connects (`event: "audit"`), or a row of
/// `bindtrace check`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub time: String,
    pub event: &'static str,
    /// A [`Verdict`]'s name, or `ok` (only `bindtrace check` lists healthy ports).
    pub verdict: &'static str,
    pub proto: &'static str,
    pub family: &'static str,
    /// The container address forwarded connections arrive at.
    pub target_ip: Option<IpAddr>,
    pub target_port: u16,
    pub netns: u64,
    pub container: ContainerReport,
    /// The first host binding of the port, and all of them.
    pub published: Option<Binding>,
    pub bindings: Vec<Binding>,
    pub listeners: Vec<ListenerReport>,
    pub hint: String,
}

/// A line about lines: what could not be delivered.
#[derive(Debug, Clone, Serialize)]
pub struct LostReport {
    pub time: String,
    pub event: &'static str,
    /// Where: `kernel_ringbuf` (samples dropped, their counts are still in the next lines), or
    /// `kernel_recursion` (hook invocations the kernel skipped: those refusals are not counted).
    pub stage: &'static str,
    pub count: u64,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
