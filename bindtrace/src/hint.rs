//! The fix, in one sentence a developer can act on.
use std::net::IpAddr;

use crate::{
    report::ListenerReport,
    verdict::{Verdict, is_loopback},
};

/// `addr:port` with IPv6 in brackets.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn who(listeners: &[ListenerReport]) -> String {
    let mut names: Vec<String> = Vec::new();
    for l in listeners {
        for p in &l.pids {
            let name = format!("{} (pid {})", p.comm, p.pid);
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    match names.len() {
        0 => "the service".into(),
        1..=3 => names.join(", "),
        n => format!("{} and {} more", names[..3].join(", "), n - 3),
    }
}

/// The wildcard address of the target's family, the one the service should bind to.
fn wildcard_for(target: Option<IpAddr>) -> &'static str {
    match target {
        Some(IpAddr::V6(_)) => "[::]",
        _ => "0.0.0.0",
    }
}

pub fn hint(verdict: Verdict, target: Option<IpAddr>, port: u16, listeners: &[ListenerReport]) -> String {
    let bound: Vec<String> = listeners.iter().map(|l| endpoint(l.ip, l.port)).collect();
    let bound = bound.join(", ");
    let any = wildcard_for(target);
    match verdict {
        Verdict::LoopbackOnly => {
            let lo: Vec<&ListenerReport> = listeners.iter().filter(|l| is_loopback(l.ip)).collect();
            let lo_addrs: Vec<String> = lo.iter().map(|l| endpoint(l.ip, l.port)).collect();
            format!(
                "{} listens on {} only: that is the container's own loopback, which forwarded \
                 connections never reach. Bind to {any}:{port} instead (e.g. `--host 0.0.0.0`); \
                 to keep it private, publish it on the host's loopback: -p 127.0.0.1:{port}:{port}",
                who(listeners),
                lo_addrs.join(", ")
            )
        }
        Verdict::WrongFamily => match target {
            Some(IpAddr::V6(_)) => format!(
                "{} listens on {bound} (IPv4 only) and this connection came over IPv6: bind to \
                 [::]:{port} (dual-stack) as well, or connect over IPv4",
                who(listeners)
            ),
            _ => format!(
                "{} listens on {bound} with IPV6_V6ONLY, so IPv4 connections are refused: bind to \
                 0.0.0.0:{port} as well, or clear IPV6_V6ONLY to accept both",
                who(listeners)
            ),
        },
        Verdict::OtherAddress => format!(
            "{} listens on {bound} only, not on {}: bind to {any}:{port} (or to that address)",
            who(listeners),
            target.map(|t| t.to_string()).unwrap_or_else(|| "the address connected to".into())
        ),
        Verdict::NoListener if listeners.is_empty() => format!(
            "nothing listens on any TCP port in this namespace: is the service running (or did it \
             crash at start)? It must listen on {any}:{port}"
        ),
        Verdict::NoListener => {
            let mut ports: Vec<u16> = listeners.iter().map(|l| l.port).collect();
            ports.sort_unstable();
            ports.dedup();
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!(
                "nothing listens on port {port} here; this namespace listens on {} ({bound}). \
                 Publish the port the service uses (e.g. -p {port}:{}) or make it listen on {any}:{port}",
                ports.join(", "),
                ports[0]
            )
        }
        Verdict::ListeningNow => format!(
            "{bound} accepts this address now: the service was not listening yet when the connection \
             came (starting or restarting); retry, or wait for readiness before sending traffic"
        ),
        Verdict::Unknown => {
            "the namespace was gone before it could be inspected (the container stopped?)".into()
        }
    }
}
