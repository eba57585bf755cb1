//! The fix, in one sentence a developer can act on.
use std::net::IpAddr;

use crate::{
    diagnose::framework::BindFix,
    diagnose::report::ListenerReport,
    diagnose::verdict::{Verdict, is_loopback},
};

/// `addr:port` with IPv6 in brackets.
pub(crate) fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn who(listeners: &[ListenerReport]) -> String {
    let mut names: Vec<String> = Vec::new();
    for l in listeners {
        for p in &l.pids {
            let name = match p.container_pid {
                Some(inner) => format!("{} (pid {}, {inner} in the container)", p.comm, p.pid),
                None => format!("{} (pid {})", p.comm, p.pid),
            };
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

#[cfg(test)]
pub(crate) fn hint(
    verdict: Verdict,
    target: Option<IpAddr>,
    port: u16,
    listeners: &[ListenerReport],
) -> String {
    hint_in(&HintContext::default(), verdict, target, port, listeners)
}

/// What is known around a refusal that makes the hint exact: the host port it was published
/// on (for the `-p` forms).
#[derive(Debug, Clone, Default)]
pub(crate) struct HintContext {
    pub(crate) host_port: Option<u16>,
    /// A UDP refusal: its `-p` forms need `/udp` (Docker publishes TCP without it).
    pub(crate) udp: bool,
}

/// The server-specific fix for a loopback bind, from the listeners' command lines.
fn bind_fix(listeners: &[ListenerReport], port: u16, any: &str, udp: bool) -> Option<BindFix> {
    let any = any.trim_start_matches('[').trim_end_matches(']');
    listeners.iter().filter(|l| is_loopback(l.ip)).flat_map(|l| &l.pids).find_map(|p| {
        let udp_fix = || crate::diagnose::udp_servers::bind_fix(&p.argv, &p.exe, port, any);
        let fix = || crate::diagnose::framework::bind_fix(&p.argv, &p.exe, port, any);
        if udp { udp_fix().or_else(fix) } else { fix() }
    })
}

pub(crate) fn hint_in(
    ctx: &HintContext,
    verdict: Verdict,
    target: Option<IpAddr>,
    port: u16,
    listeners: &[ListenerReport],
) -> String {
    let bound: Vec<String> = listeners.iter().map(|l| endpoint(l.ip, l.port)).collect();
    let bound = bound.join(", ");
    let any = wildcard_for(target);
    let host_port = ctx.host_port.unwrap_or(port);
    let (suffix, proto) = if ctx.udp { ("/udp", "UDP") } else { ("", "TCP") };
    // When the port is published, the safer form goes with every fix.
    let private = |ctr: u16| match ctx.host_port {
        Some(h) => {
            format!("; to keep it private, publish it on the host's loopback: -p 127.0.0.1:{h}:{ctr}{suffix}")
        }
        None => String::new(),
    };
    match verdict {
        Verdict::LoopbackOnly => {
            let lo: Vec<&ListenerReport> = listeners.iter().filter(|l| is_loopback(l.ip)).collect();
            let lo_addrs: Vec<String> = lo.iter().map(|l| endpoint(l.ip, l.port)).collect();
            let fix = match bind_fix(listeners, port, any, ctx.udp) {
                Some(fix) => format!("Bind to {any}:{port} instead: {}", fix.advice),
                None if ctx.udp => {
                    format!(
                        "Bind to {any}:{port} instead: {}",
                        crate::diagnose::udp_servers::generic(port, any)
                    )
                }
                None => format!("Bind to {any}:{port} instead (e.g. `--host 0.0.0.0`)"),
            };
            format!(
                "{} listens on {} only: that is the container's own loopback, which forwarded \
                 connections never reach. {fix}; to keep it private, publish it on the host's \
                 loopback: -p 127.0.0.1:{host_port}:{port}{suffix}",
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
                 0.0.0.0:{port} as well, or clear IPV6_V6ONLY to accept both{}",
                who(listeners),
                private(port)
            ),
        },
        Verdict::OtherAddress => format!(
            "{} listens on {bound} only, not on {}: bind to {any}:{port} (or to that address){}",
            who(listeners),
            target.map(|t| t.to_string()).unwrap_or_else(|| "the address connected to".into()),
            private(port)
        ),
        Verdict::NoListener if listeners.is_empty() => format!(
            "nothing listens on any {proto} port in this namespace: is the service running (or did it \
             crash at start)? It must listen on {any}:{port}{}",
            private(port)
        ),
        Verdict::NoListener => {
            let mut ports: Vec<u16> = listeners.iter().map(|l| l.port).collect();
            ports.sort_unstable();
            ports.dedup();
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            let used: u16 = ports[0].parse().unwrap_or(port);
            format!(
                "nothing listens on port {port} here; this namespace listens on {} ({bound}). \
                 Publish the port the service uses (e.g. -p {host_port}:{used}{suffix}) or make it listen on \
                 {any}:{port}{}",
                ports.join(", "),
                private(used)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::procfs::Holder;

    fn listener(ip: &str, port: u16, holder: Holder) -> ListenerReport {
        ListenerReport { ip: ip.parse().unwrap(), port, pids: vec![holder], pids_omitted: 0 }
    }

    fn httpd() -> Holder {
        let argv: Vec<String> =
            ["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"].map(String::from).to_vec();
        Holder {
            pid: 31455,
            comm: "httpd".into(),
            container_pid: Some(1),
            cmdline: argv.join(" "),
            cmdline_truncated: 0,
            argv,
            exe: "busybox".into(),
        }
    }

    #[test]
    fn loopback_hint_names_the_flag_and_the_published_port() {
        let l = [listener("127.0.0.1", 8000, httpd())];
        let ctx = HintContext { host_port: Some(18000), ..Default::default() };
        let h = hint_in(&ctx, Verdict::LoopbackOnly, Some("172.17.0.2".parse().unwrap()), 8000, &l);
        assert!(h.starts_with("httpd (pid 31455, 1 in the container) listens on 127.0.0.1:8000 only"), "{h}");
        assert!(
            h.contains("busybox httpd is started with `-p 127.0.0.1:8000`: use `-p 0.0.0.0:8000`"),
            "{h}"
        );
        assert!(h.ends_with("-p 127.0.0.1:18000:8000"), "{h}");
    }

    #[test]
    fn udp_hints_publish_with_the_udp_suffix() {
        let l = [listener("127.0.0.1", 53, Holder::new(7, "python3"))];
        let ctx = HintContext { host_port: Some(5353), udp: true };
        let h = hint_in(&ctx, Verdict::LoopbackOnly, Some("172.17.0.2".parse().unwrap()), 53, &l);
        assert!(h.ends_with("-p 127.0.0.1:5353:53/udp"), "{h}");
        let h = hint_in(&ctx, Verdict::NoListener, Some("172.17.0.2".parse().unwrap()), 53, &[]);
        assert!(h.contains("nothing listens on any UDP port") && h.ends_with(":53/udp"), "{h}");
    }

    #[test]
    fn plain_hint_is_unchanged_without_context() {
        let l = [listener("127.0.0.1", 8000, Holder::new(7, "python3"))];
        let h = hint(Verdict::LoopbackOnly, Some("172.17.0.2".parse().unwrap()), 8000, &l);
        assert!(h.contains("Bind to 0.0.0.0:8000 instead (e.g. `--host 0.0.0.0`)"), "{h}");
        assert!(h.ends_with("-p 127.0.0.1:8000:8000"), "{h}");
    }

    #[test]
    fn port_mismatch_uses_the_host_port() {
        let l = [listener("0.0.0.0", 3000, Holder::new(7, "node"))];
        let ctx = HintContext { host_port: Some(8000), ..Default::default() };
        let h = hint_in(&ctx, Verdict::NoListener, Some("172.17.0.2".parse().unwrap()), 8000, &l);
        assert!(h.contains("listens on 3000") && h.contains("-p 8000:3000"), "{h}");
        assert!(h.ends_with("-p 127.0.0.1:8000:3000"), "{h}");
        // Without a published port (a plain namespace, a direct connection) no -p advice.
        let h = hint(Verdict::OtherAddress, Some("172.17.0.2".parse().unwrap()), 8000, &l);
        assert!(!h.contains("-p "), "{h}");
    }
}
