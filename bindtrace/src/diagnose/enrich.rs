//! Turns a folded line (kernel key, count, sample) into a full report: the namespace's
//! listeners, the verdict, the processes, the hint.
//!
//! Lines come in batches (everything the ring buffer held when the loop woke up); a batch shares
//! one [`NamespaceReads`], so a burst of new ports reads each namespace once.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bindtrace_common::{AF_INET6, HookKind, RefusalEvent};

use crate::{
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

/// Builds the report for `line`. `port` is None when the interface left scope before we got
/// here (the container stopped): the verdict is then `unknown`.
pub(crate) fn report(
    line: &Line,
    port: Option<&Port>,
    bridges: &Bridges,
    hook: &'static str,
    seen: &mut NamespaceReads,
) -> Report {
    let sample = line.sample.as_ref();
    let family = line.key.family;
    let target_ip = sample.map(|s| addr_of(family, &s.target_addr));
    let unspecified = if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    // The decision owns the listeners it keeps, so the batch's snapshot is not copied per line.
    let decided = port.map(|p| {
        let decision = seen
            .listening(&p.ns)
            .map(|found| verdict::decide(target_ip.unwrap_or(unspecified), line.key.port, &found.listeners));
        (p, decision.map_err(|e| e.to_string()))
    });
    let (verdict, (listeners, listeners_omitted)) = match decided {
        Some((p, Ok(decision))) => (decision.verdict, seen.reports(&p.ns, &decision.listeners)),
        Some((_, Err(e))) => {
            log::debug!("reading listeners: {e}");
            (Verdict::Unknown, (Vec::new(), 0))
        }
        None => (Verdict::Unknown, (Vec::new(), 0)),
    };
    Report {
        time: now_rfc3339(),
        ktime_ns: sample.map(|s| s.ktime_ns),
        event: "refused",
        verdict,
        proto: "tcp",
        family: if family == AF_INET6 { "ipv6" } else { "ipv4" },
        target_ip,
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
        hook: hook_name(sample, hook),
        // Written with the attribution, which knows the published port the fix names.
        hint: String::new(),
        listeners,
        listeners_omitted,
        count: line.count,
        // Filled in by the caller, which knows the overflow total.
        count_unknown: None,
        docker: Default::default(),
    }
}
