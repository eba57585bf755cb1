//! Turns a folded line (kernel key, count, sample) into a full report: the namespace's
//! listeners, the verdict, the processes, the hint.
//!
//! Lines come in batches (everything the ring buffer held when the loop woke up). Reading a
//! namespace's listeners means joining it from a thread, and finding who holds a socket means
//! walking /proc: each is done at most once per namespace per batch, however many keys a burst
//! of new ports brings.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use bindtrace_common::{AF_INET6, HookKind, RefusalEvent};

use crate::{
    diagnose::hint::hint,
    diagnose::listeners::{self, Listener},
    diagnose::procfs::{self, Holder},
    diagnose::report::{ListenerReport, Report, now_rfc3339},
    diagnose::verdict::{self, Verdict},
    netns::scope::{Bridges, Port},
    sources::fold::Line,
};

/// What one batch has read of each namespace, by namespace inode.
#[derive(Default)]
pub(crate) struct Snapshots {
    listeners: HashMap<u64, Result<Vec<Listener>, String>>,
    holders: HashMap<u64, BTreeMap<u64, Vec<Holder>>>,
}

impl Snapshots {
    fn listeners(&mut self, port: &Port) -> Result<&[Listener], &str> {
        self.listeners
            .entry(port.ns.inode)
            .or_insert_with(|| listeners::listeners_in(&port.ns).map_err(|e| e.to_string()))
            .as_deref()
            .map_err(String::as_str)
    }

    /// The holders of every listener of the namespace, found in one walk of /proc.
    fn holders(&mut self, port: &Port) -> &BTreeMap<u64, Vec<Holder>> {
        if !self.holders.contains_key(&port.ns.inode) {
            let inodes: Vec<u64> = match self.listeners(port) {
                Ok(all) => all.iter().map(|l| l.inode).collect(),
                Err(_) => Vec::new(),
            };
            self.holders.insert(port.ns.inode, procfs::holders(&inodes, port.ns.inode));
        }
        &self.holders[&port.ns.inode]
    }
}

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
    seen: &mut Snapshots,
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
            .listeners(p)
            .map(|all| verdict::decide(target_ip.unwrap_or(unspecified), line.key.port, all));
        (p, decision.map_err(str::to_owned))
    });
    let (verdict, listeners) = match decided {
        Some((p, Ok(decision))) => {
            let holders = if decision.listeners.is_empty() { &BTreeMap::new() } else { seen.holders(p) };
            let listeners = decision
                .listeners
                .iter()
                .map(|l| ListenerReport {
                    ip: l.addr,
                    port: l.port,
                    pids: holders.get(&l.inode).cloned().unwrap_or_default(),
                })
                .collect();
            (decision.verdict, listeners)
        }
        Some((_, Err(e))) => {
            log::debug!("reading listeners: {e}");
            (Verdict::Unknown, Vec::new())
        }
        None => (Verdict::Unknown, Vec::new()),
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
        hint: hint(verdict, target_ip, line.key.port, &listeners),
        listeners,
        count: line.count,
        docker: Default::default(),
    }
}
