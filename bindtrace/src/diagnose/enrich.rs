//! Turns a folded line (kernel key, count, sample) into a full report: the namespace's
//! listeners, the verdict, the processes, the hint.
//!
//! Lines come in batches (everything the ring buffer held when the loop woke up); a batch shares
//! one [`NamespaceReads`], so a burst of new ports reads each namespace once.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bindtrace_common::{AF_INET6, HookKind, RefusalEvent};

use crate::{
    diagnose::listeners::Proto,
    diagnose::namespace_reads::NamespaceReads,
    diagnose::report::{Report, now_rfc3339},
    diagnose::verdict::{self, Verdict},
    netns::scope::{Bridges, Port},
    sources::fold::Line,
};

pub(crate) fn addr_of(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

fn hook_name(sample: Option<&RefusalEvent>, fallback: &'static str) -> &'static str {
    match sample.and_then(|s| HookKind::from_u8(s.hook)) {
        Some(HookKind::TcpSendReset) => "tcp-send-reset",
        Some(HookKind::KfreeSkb) => "kfree-skb",
        Some(HookKind::Tc) => "tc",
        None => fallback,
    }
}

/// Whether a count of `proto` on `hook` counts replies the kernel rate-limits (UDP on tc: the
/// ICMP port unreachables), so that it is only a lower bound of the refusals.
pub(crate) fn counts_replies(hook: &str, proto: Proto) -> bool {
    hook == "tc" && proto == Proto::Udp
}

/// Why a line carries no diagnosis (its verdict is then `unknown`): the JSON field
/// `undiagnosed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Undiagnosed {
    /// The interface left scope before the line got here (the container stopped).
    NamespaceGone,
    /// The enrichment queue was full (`--enrich-queue`): see `app/enrichment.rs`.
    QueueFull,
    /// Reading the namespace failed (the reason is logged at debug level).
    ReadFailed,
    /// The diagnosis itself failed (a bug: it is logged).
    Failed,
}

impl Undiagnosed {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Undiagnosed::NamespaceGone => "namespace_gone",
            Undiagnosed::QueueFull => "queue_full",
            Undiagnosed::ReadFailed => "read_failed",
            Undiagnosed::Failed => "failed",
        }
    }

    pub(crate) fn from_str(s: &str) -> Option<Undiagnosed> {
        [Undiagnosed::NamespaceGone, Undiagnosed::QueueFull, Undiagnosed::ReadFailed, Undiagnosed::Failed]
            .into_iter()
            .find(|u| u.as_str() == s)
    }

    /// What the line says instead of a fix.
    pub(crate) fn hint(self) -> &'static str {
        match self {
            Undiagnosed::NamespaceGone => {
                "the namespace was gone before it could be inspected (the container stopped?)"
            }
            Undiagnosed::QueueFull => {
                "not diagnosed: the enrichment queue was full (a namespace is slow to read; see --enrich-queue); \
                 the count is exact, the next line of this port is diagnosed again"
            }
            Undiagnosed::ReadFailed => {
                "not diagnosed: the namespace's listeners could not be read (run with -v for why)"
            }
            Undiagnosed::Failed => {
                "not diagnosed: the diagnosis failed (a bug: please report it with the -v log)"
            }
        }
    }
}

/// Builds the report for `line`. `port` is None when the interface left scope before we got
/// here (the container stopped): the verdict is then `unknown`.
pub(crate) fn report(
    line: &Line,
    port: Option<&Port>,
    bridges: &Bridges,
    hook: &'static str,
    seen: &mut NamespaceReads,
) -> Report {
    let Some(p) = port else {
        return undiagnosed(line, port, bridges, hook, Undiagnosed::NamespaceGone);
    };
    let family = line.key.family;
    let unspecified = if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let proto = Proto::from_ip(line.key.proto);
    let target_ip = line.sample.as_ref().map(|s| addr_of(family, &s.target_addr));
    // Without a sample the address is not known: the interface's own addresses of the family
    // stand for it (a listener on the container's address is reachable there).
    let own: Vec<IpAddr> = match target_ip {
        Some(t) => vec![t],
        None => seen
            .addresses(&p.ns, p.ifindex)
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == (family == AF_INET6))
            .collect(),
    };
    let decision = match seen.listening(&p.ns, proto) {
        Ok(found) => verdict::decide_among(&own, unspecified, line.key.port, &found.listeners, &found.v6only),
        Err(e) => {
            log::debug!("reading listeners: {e}");
            return undiagnosed(line, port, bridges, hook, Undiagnosed::ReadFailed);
        }
    };
    // The decision owns the listeners it keeps, so the batch's snapshot is not copied per line.
    let (listeners, listeners_omitted) = seen.reports(&p.ns, proto, &decision.listeners);
    Report {
        verdict: decision.verdict,
        listeners,
        listeners_omitted,
        undiagnosed: None,
        ..undiagnosed(line, port, bridges, hook, Undiagnosed::Failed)
    }
}

/// The report of `line` without reading its namespace: everything the kernel's key and sample
/// say, verdict `unknown`, and why there is no more.
pub(crate) fn undiagnosed(
    line: &Line,
    port: Option<&Port>,
    bridges: &Bridges,
    hook: &'static str,
    why: Undiagnosed,
) -> Report {
    let sample = line.sample.as_ref();
    let family = line.key.family;
    let hook = hook_name(sample, hook);
    let proto = Proto::from_ip(line.key.proto);
    Report {
        time: now_rfc3339(),
        ktime_ns: sample.map(|s| s.ktime_ns),
        event: "refused",
        verdict: Verdict::Unknown,
        undiagnosed: Some(why.as_str()),
        proto: proto.name(),
        family: if family == AF_INET6 { "ipv6" } else { "ipv4" },
        target_ip: sample.map(|s| addr_of(family, &s.target_addr)),
        target_port: line.key.port,
        client_ip: sample.map(|s| addr_of(family, &s.client_addr)),
        client_port: sample.map(|s| s.client_port),
        netns: port.map(|p| p.ns.inode).or(sample.map(|s| s.netns_ino as u64)).unwrap_or(0),
        netns_cookie: line.key.netns_cookie,
        bridge: port
            .map(|p| bridges.name(p.bridge).to_owned())
            .or(sample.map(|s| bridges.name(s.bridge).to_owned()))
            .unwrap_or_default(),
        ifindex: line.key.ifindex,
        veth: port.map(|p| p.host_ifname.clone()).unwrap_or_default(),
        hook,
        // Written with the attribution, which knows the published port the fix names.
        hint: String::new(),
        listeners: Vec::new(),
        listeners_omitted: 0,
        count: line.count,
        count_at_least: counts_replies(hook, proto),
        // Filled in by the caller, which knows the overflow total.
        count_unknown: None,
        docker: Default::default(),
    }
}
