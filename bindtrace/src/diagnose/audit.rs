//! The proactive audit: each published TCP and UDP port of a running container is checked against
//! the listeners inside the container, before any client connects.
//!
//! A port is reachable when some listener on it accepts the container's address (`0.0.0.0`,
//! that address, or `[::]` without IPV6_V6ONLY). Otherwise the refusal verdicts apply as they
//! would to a connection: loopback-only, wrong family, another address, or nothing listening.
//! "Nothing listening" is only reported once the container has been up for the grace period
//! (`--audit-grace`): a service that is still starting is not a misconfiguration.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    diagnose::hint::{HintContext, hint_in},
    diagnose::listeners::{Listener, Listening, Proto},
    diagnose::namespace_reads::NamespaceReads,
    diagnose::report::{AuditReport, ContainerReport, ListenerReport, now_rfc3339},
    diagnose::verdict::{self, Verdict},
    netns::Netns,
    sources::docker::{Container, Inventory, PortMapping},
};

/// Default of `--audit-grace`: how long a container may take to start listening on a
/// published port before "nothing listens" is reported. Long enough for interpreters and
/// frameworks that load a lot at start (Rails, Spring, Next.js builds take tens of seconds).
pub(crate) const DEFAULT_GRACE: &str = "30s";
/// How often a port that has no listener yet is looked at again during the grace period.
pub(crate) const POLL: Duration = Duration::from_millis(500);

/// The outcome for one published port.
#[derive(Debug, Clone)]
pub(crate) struct PortCheck {
    pub(crate) mapping: PortMapping,
    /// None when the port is reachable.
    pub(crate) verdict: Option<Verdict>,
    pub(crate) target: Option<IpAddr>,
    pub(crate) listeners: Vec<ListenerReport>,
    pub(crate) listeners_omitted: usize,
}

/// Opens the container's network namespace: its sandbox handle, else its main process's.
pub(crate) fn open_netns(c: &Container) -> io::Result<Netns> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the container has no network namespace handle");
    if let Some(key) = &c.sandbox_key {
        match Netns::open(key) {
            Ok(ns) => return Ok(ns),
            Err(e) => last = e,
        }
    }
    if c.pid > 0 {
        match Netns::open(Path::new(&format!("/proc/{}/ns/net", c.pid))) {
            Ok(ns) => return Ok(ns),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Decides one port from the namespace's listeners (pure: the tests feed it).
pub(crate) fn decide(
    target: IpAddr,
    port: u16,
    all: &[Listener],
    v6only: &HashSet<u64>,
) -> (Option<Verdict>, Vec<Listener>) {
    let d = verdict::decide(target, port, all, v6only);
    match d.verdict {
        Verdict::ListeningNow => (None, d.listeners),
        v => (Some(v), d.listeners),
    }
}

/// Checks one published port of `c`, whose namespace is `ns`, for connections to `target` (one
/// of [`Container::targets`]; None when the container has no address), with this pass's `reads`.
pub(crate) fn check_port(
    mapping: &PortMapping,
    target: Option<IpAddr>,
    ns: &Netns,
    reads: &mut NamespaceReads,
) -> io::Result<PortCheck> {
    // The error is the namespace's, shared by every port of the pass: say it again per port.
    let proto = if mapping.proto == "udp" { Proto::Udp } else { Proto::Tcp };
    let Listening { listeners: all, v6only } =
        reads.listening(ns, proto).map_err(|e| match e.raw_os_error() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(e.kind(), e.to_string()),
        })?;
    let (verdict, listeners) =
        decide(target.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), mapping.container_port, all, v6only);
    let (listeners, listeners_omitted) = reads.reports(ns, proto, &listeners);
    Ok(PortCheck { mapping: mapping.clone(), verdict, target, listeners, listeners_omitted })
}

/// The audit record for a checked port.
pub(crate) fn report(c: &Container, check: &PortCheck, netns: u64) -> AuditReport {
    let port = check.mapping.container_port;
    let published = preferred(&check.mapping, check.target);
    let hint = match check.verdict {
        Some(v) => hint_in(
            &HintContext { host_port: published.map(|b| b.host_port), udp: check.mapping.proto == "udp" },
            v,
            check.target,
            port,
            &check.listeners,
        ),
        None => String::new(),
    };
    AuditReport {
        time: now_rfc3339(),
        event: "audit",
        verdict: check.verdict.map_or("ok", Verdict::as_str),
        proto: check.mapping.proto_str(),
        family: if check.target.is_some_and(|t| t.is_ipv6()) { "ipv6" } else { "ipv4" },
        target_ip: check.target,
        target_port: port,
        netns,
        container: ContainerReport::from(c),
        published,
        // The bindings whose connections reach the address checked (all of them for a
        // container without an address).
        bindings: check
            .mapping
            .bindings
            .iter()
            .filter(|b| check.target.is_none() || c.target_of(b) == check.target)
            .copied()
            .collect(),
        listeners: check.listeners.clone(),
        listeners_omitted: check.listeners_omitted,
        hint,
    }
}

/// The binding to show first: one of the target's family (an IPv6 client of an IPv6 binding
/// reaches the container's IPv6 address), else IPv4 before IPv6, as `docker ps` does.
fn preferred(m: &PortMapping, target: Option<IpAddr>) -> Option<crate::sources::docker::Binding> {
    let v6 = target.is_some_and(|t| t.is_ipv6());
    m.bindings
        .iter()
        .find(|b| b.host_ip.is_ipv6() == v6)
        .or(m.bindings.iter().find(|b| b.host_ip.is_ipv4()))
        .or(m.bindings.first())
        .copied()
}

/// The addresses to audit `m` at ([`Container::targets`]), or a single None (judged against
/// 0.0.0.0) for a container without any address.
pub(crate) fn targets_or_none(c: &Container, m: &PortMapping) -> Vec<Option<IpAddr>> {
    let targets = c.targets(m);
    if targets.is_empty() { vec![None] } else { targets.into_iter().map(Some).collect() }
}

/// How long after its start a container's ports may still have no listener.
pub(crate) fn deadline(c: &Container, grace: Duration, now: Instant) -> Instant {
    let age = c.started_at.and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or(Duration::ZERO);
    now + grace.saturating_sub(age)
}

/// (container id, container port, protocol, address checked).
type AuditKey = (String, u16, &'static str, Option<IpAddr>);

struct Pending {
    deadline: Instant,
    next: Instant,
}

/// The detector's audit schedule: every published port of every container start, checked at
/// once, then again every [`POLL`] while nothing listens, until the grace period ends.
pub(crate) struct Auditor {
    grace: Duration,
    /// By (container id, container port, protocol, address checked): each protocol and family
    /// published is its own.
    pending: BTreeMap<AuditKey, Pending>,
    /// Container starts already scheduled (id -> start time), so each start is audited once.
    scheduled: HashMap<String, Option<SystemTime>>,
}

impl Auditor {
    pub(crate) fn new(grace: Duration) -> Auditor {
        Auditor { grace, pending: BTreeMap::new(), scheduled: HashMap::new() }
    }

    /// Schedules the ports of containers that started since the last inventory.
    pub(crate) fn on_inventory(&mut self, inv: &Inventory, now: Instant) {
        for c in inv.containers.values().filter(|c| c.owns_netns()) {
            if self.scheduled.get(&c.id) == Some(&c.started_at) {
                continue;
            }
            self.scheduled.insert(c.id.clone(), c.started_at);
            let deadline = deadline(c, self.grace, now);
            for m in c.published() {
                for target in targets_or_none(c, m) {
                    let key = (c.id.clone(), m.container_port, m.proto_str(), target);
                    self.pending.insert(key, Pending { deadline, next: now });
                }
            }
        }
        self.scheduled.retain(|id, _| inv.containers.contains_key(id));
        self.pending.retain(|(id, _, _, _), _| inv.containers.contains_key(id));
    }

    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next).min()
    }

    /// Runs the checks that are due. `in_scope` maps namespace inodes of watched container
    /// interfaces to their open namespaces: containers not on a watched bridge are skipped.
    pub(crate) fn run(
        &mut self,
        inv: &Inventory,
        in_scope: &HashMap<u64, Arc<Netns>>,
        now: Instant,
    ) -> Vec<AuditReport> {
        let mut out = Vec::new();
        let mut reads = NamespaceReads::default();
        let mut checked = 0;
        let due: Vec<AuditKey> =
            self.pending.iter().filter(|(_, p)| p.next <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            let Some(p) = self.pending.get_mut(&key) else { continue };
            let expired = now >= p.deadline;
            let Some(c) = inv.containers.get(&key.0) else {
                self.pending.remove(&key);
                continue;
            };
            let Some(ns) = c.netns_inodes.iter().find_map(|i| in_scope.get(i)) else {
                // Not (yet) on a watched bridge: Docker may report the start before the veth
                // is in place. Give up once the grace period is over.
                if expired {
                    self.pending.remove(&key);
                } else {
                    p.next = now + POLL;
                }
                continue;
            };
            let Some(mapping) = c.port(key.1, key.2) else {
                self.pending.remove(&key);
                continue;
            };
            checked += 1;
            match check_port(mapping, key.3, ns, &mut reads) {
                Err(e) => {
                    log::debug!("auditing {}:{}/{}: {e}", c.name, key.1, key.2);
                    if expired {
                        self.pending.remove(&key);
                    } else {
                        p.next = now + POLL;
                    }
                }
                Ok(check) if check.verdict.is_none() => {
                    log::debug!("audit: {} port {}/{} is reachable", c.name, key.1, key.2);
                    self.pending.remove(&key);
                }
                Ok(check) if check.verdict == Some(Verdict::NoListener) && !expired => p.next = now + POLL,
                Ok(check) => {
                    out.push(report(c, &check, ns.inode));
                    self.pending.remove(&key);
                }
            }
        }
        if checked > 0 {
            // Work per container is bounded: a namespace is read once per pass, however many
            // ports it publishes (the tests count these).
            log::debug!("audit pass: {checked} ports checked, {} namespace reads", reads.reads());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(addr: &str, port: u16, inode: u64) -> Listener {
        Listener { addr: addr.parse().unwrap(), port, inode }
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reachable_listeners() {
        let none = HashSet::new();
        for bound in ["0.0.0.0", "172.17.0.2", "::", "::ffff:172.17.0.2"] {
            assert_eq!(decide(ip("172.17.0.2"), 8000, &[l(bound, 8000, 1)], &none).0, None, "{bound}");
        }
    }

    #[test]
    fn misbindings_get_the_refusal_verdicts() {
        let none = HashSet::new();
        let t = ip("172.17.0.2");
        assert_eq!(decide(t, 8000, &[l("127.0.0.1", 8000, 1)], &none).0, Some(Verdict::LoopbackOnly));
        assert_eq!(decide(t, 8000, &[l("10.0.0.9", 8000, 1)], &none).0, Some(Verdict::OtherAddress));
        let (v, listeners) = decide(t, 8000, &[l("0.0.0.0", 3000, 1)], &none);
        assert_eq!(v, Some(Verdict::NoListener));
        assert_eq!(listeners[0].port, 3000);
        // [::] with IPV6_V6ONLY does not take the container's IPv4 address.
        let v6only = HashSet::from([7]);
        assert_eq!(decide(t, 80, &[l("::", 80, 7)], &v6only).0, Some(Verdict::WrongFamily));
        assert_eq!(decide(t, 80, &[l("::", 80, 8)], &v6only).0, None);
    }
}
