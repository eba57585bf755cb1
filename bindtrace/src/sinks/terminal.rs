//! The terminal form of a record: a headline of at most [`HEADLINE_COLUMNS`] columns with the
//! facts that matter at a glance (time, what happened, which workload and port, through which
//! published address, the verdict), then indented detail lines with every value whole: what
//! listens, who connected, the fix, the private form. Long values are elided in the middle in
//! the headline only. Every outside value is escaped ([`escape`](super::escape)) before it is
//! measured, so the width counted is the width shown.
use std::net::IpAddr;

use super::{
    escape::{escaped, field},
    style::{self, Painter},
    width::{elide_middle, width},
};
use crate::{
    diagnose::hint::endpoint,
    diagnose::report::{
        AuditReport, ContainerReport, DockerContext, ListenerReport, LostReport, Report, Via,
    },
};

/// A headline fits an 100-column terminal without wrapping.
pub(crate) const HEADLINE_COLUMNS: usize = 100;
/// Width of the detail lines' labels.
const LABEL: usize = 9;

/// `2026-12-03T10:51:51Z` from the record's RFC 3339 time (milliseconds stay in the JSON and
/// the piped form: a person reading the terminal does not need them).
pub(crate) fn seconds(time: &str) -> String {
    match time.split_once('.') {
        Some((secs, rest)) => {
            let offset = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            format!("{secs}{offset}")
        }
        None => time.to_owned(),
    }
}

/// Which workload: the container's name, or the namespace when it is not a container.
pub(crate) fn workload(container: Option<&ContainerReport>, netns: u64) -> String {
    match container {
        Some(c) => escaped(&c.name).into_owned(),
        None => format!("netns {netns}"),
    }
}

/// The headline's two elidable values cut to share `room` columns: each gets what it needs
/// when the other needs less than half.
fn share(a: &str, b: &str, room: usize) -> (String, String) {
    let (wa, wb) = (width(a), width(b));
    if wa + wb <= room {
        return (a.to_owned(), b.to_owned());
    }
    let half = room / 2;
    let (ma, mb) = if wa <= half {
        (wa, room - wa)
    } else if wb <= room - half {
        (room - wb, wb)
    } else {
        (half, room - half)
    };
    (elide_middle(a, ma).into_owned(), elide_middle(b, mb).into_owned())
}

/// `TIME LABEL WORKLOAD PORT/PROTO [on PUBLISHED] [via HOW]: VERDICT [xN]`, the workload and
/// the published address elided to fit.
#[allow(clippy::too_many_arguments)]
fn headline(
    p: Painter,
    time: &str,
    label: &str,
    label_style: anstyle::Style,
    workload: &str,
    port: String,
    published: Option<String>,
    via: Option<Via>,
    verdict: &str,
    verdict_style: anstyle::Style,
    count: &str,
) -> String {
    let time = seconds(time);
    let via = via.map(|v| format!(" via {}", v.as_str())).unwrap_or_default();
    let published_text = published.unwrap_or_default();
    let on = if published_text.is_empty() { "" } else { " on " };
    // Everything but the two elidable values, as plain text, to measure.
    let fixed = width(&time)
        + 1
        + width(label)
        + 1
        + 1
        + width(&port)
        + on.len()
        + via.len()
        + 2
        + width(verdict)
        + count.len();
    let room = HEADLINE_COLUMNS.saturating_sub(fixed);
    let (w, pubd) = share(workload, &published_text, room);
    format!(
        "{time} {} {} {port}{on}{pubd}{via}: {}{count}",
        p.paint(label_style, label),
        p.paint(style::label(), &w),
        p.paint(verdict_style, verdict),
    )
}

fn published(d: &DockerContext) -> Option<String> {
    d.published.as_ref().map(|b| endpoint(b.host_ip, b.host_port))
}

/// ` x3`, nothing for one refusal, ` x?` when the map was full (a detail line says why), ` at
/// least x3` when the count is a lower bound (UDP on the tc hook; a detail line says why).
fn count_mark(r: &Report) -> String {
    match r.count {
        Some(n) if r.count_at_least => format!(" at least x{n}"),
        Some(n) if n > 1 => format!(" x{n}"),
        Some(_) => String::new(),
        None => " x?".into(),
    }
}

fn detail(p: Painter, label: &str, value: &str) -> String {
    format!("  {} {value}", p.paint(style::dim(), &format!("{label:<LABEL$}")))
}

fn container_detail(c: &ContainerReport) -> String {
    // Docker is the default; another engine is said, since its CLI is the one to fix it with.
    let runtime = match c.runtime {
        crate::sources::docker::Runtime::Docker => String::new(),
        other => format!(", {}", other.title()),
    };
    let mut s = format!("{} ({}, image {}{runtime})", field(&c.name), field(&c.id), field(&c.image));
    if let (Some(project), Some(service)) = (&c.compose_project, &c.compose_service) {
        s.push_str(&format!(", compose {}/{}", field(project), field(service)));
    }
    if let Some(pod) = &c.pod {
        s.push_str(&format!(", pod {}/{}", field(c.namespace.as_deref().unwrap_or("?")), field(pod)));
    }
    s
}

/// One line per listener: `127.0.0.1:8000 python3 (pid 4242, 1 in the container): CMDLINE`.
fn listener_details(p: Painter, listeners: &[ListenerReport], omitted: usize) -> Vec<String> {
    if listeners.is_empty() {
        return vec![detail(p, "listens", "nothing, on any TCP port of this namespace")];
    }
    let mut lines: Vec<String> = listeners
        .iter()
        .map(|l| {
            // Pre-forked servers: the master and its workers share one command line, shown
            // once after all their names.
            let mut groups: Vec<(&str, usize, Vec<String>)> = Vec::new();
            for h in &l.pids {
                let who = match h.container_pid {
                    Some(inner) => format!("{} (pid {}, {inner} in the container)", field(&h.comm), h.pid),
                    None => format!("{} (pid {})", field(&h.comm), h.pid),
                };
                match groups.iter_mut().find(|(c, t, _)| *c == h.cmdline && *t == h.cmdline_truncated) {
                    Some((_, _, names)) => names.push(who),
                    None => groups.push((&h.cmdline, h.cmdline_truncated, vec![who])),
                }
            }
            let mut holders: Vec<String> = groups
                .into_iter()
                .map(|(cmdline, truncated, names)| {
                    let who = names.join(", ");
                    match (cmdline.is_empty(), truncated) {
                        (true, _) => who,
                        (false, 0) => format!("{who}: {}", escaped(cmdline)),
                        (false, n) => format!("{who}: {} [{n} more bytes]", escaped(cmdline)),
                    }
                })
                .collect();
            if l.pids_omitted > 0 {
                holders.push(format!("and {} more processes", l.pids_omitted));
            }
            if holders.is_empty() {
                holders.push("no process found holding it".into());
            }
            detail(p, "listens", &format!("{} {}", endpoint(l.ip, l.port), holders.join("; ")))
        })
        .collect();
    if omitted > 0 {
        lines.push(detail(p, "listens", &format!("and {omitted} more listeners")));
    }
    lines
}

/// The hint without its private-form sentence, which has its own line. For a loopback bind,
/// only the change to make (`Bind to 0.0.0.0:8000 instead: ... use -b 0.0.0.0:8000`): the
/// `listens` line already says who listens where, and the verdict what that means. A hint of
/// another shape is shown whole.
fn fix_text(hint: &str, verdict: &str) -> String {
    let hint = escaped(hint);
    let fix = match hint.split_once("; to keep it private, publish it on the host's loopback") {
        Some((fix, _)) => fix,
        None => &hint,
    };
    match fix.split_once(". Bind to ") {
        Some((_, change)) if verdict == "loopback_only" => format!("Bind to {change}"),
        _ => fix.to_owned(),
    }
}

/// `-p 127.0.0.1:H:C`: the same port published on the host's loopback only.
fn private_form(d: &DockerContext, container_port: u16) -> Option<String> {
    let b = d.published.as_ref()?;
    let lo = match b.host_ip {
        IpAddr::V4(_) => "127.0.0.1",
        IpAddr::V6(_) => "[::1]",
    };
    Some(format!("-p {lo}:{}:{container_port}  (to keep it reachable from this host only)", b.host_port))
}

/// Who connected (the sampled refusal of a folded line) and how it got there.
fn client_detail(r: &Report) -> String {
    let mut s = match (r.client_ip, r.client_port) {
        (Some(ip), Some(port)) => endpoint(ip, port),
        _ => "unknown (every sample of this line was lost)".into(),
    };
    let d = &r.docker;
    if let Some(via) = d.via {
        s.push_str(&format!(" via {}", via.as_str()));
        match via {
            Via::DockerProxy | Via::Rootlessport | Via::Rootlesskit => {
                if let Some(c) = &d.client_process {
                    s.push_str(&format!(" (pid {})", c.pid));
                }
            }
            Via::Dnat => {
                if let Some(o) = &d.original {
                    s.push_str(&format!(
                        ", dialed as {} -> {}",
                        endpoint(o.client_ip, o.client_port),
                        endpoint(o.target_ip, o.target_port)
                    ));
                }
            }
            Via::Direct => {
                if let Some(c) = &d.client_process {
                    s.push_str(&format!(" from {} (pid {})", field(&c.comm), c.pid));
                }
                if let Some(c) = &d.client_container {
                    s.push_str(&format!(" in container {}", field(&c.name)));
                }
            }
        }
    }
    match r.count {
        Some(n) if r.count_at_least => s.push_str(&format!("  (the sampled one of at least {n})")),
        Some(n) if n > 1 => s.push_str(&format!("  (the sampled one of these {n} refusals)")),
        None => s.push_str("  (the sampled one)"),
        Some(_) => {}
    }
    s
}

/// Why a count is only a lower bound (the `count` detail line).
const AT_LEAST_WHY: &str = "at least: the tc hook counts the ICMP port unreachables the container sent, \
     and the kernel rate-limits those (--hook kfree-skb on 5.17+ counts every datagram)";

/// The headline and the detail lines of a refusal.
pub(crate) fn refusal(p: Painter, r: &Report) -> Vec<String> {
    let port = format!("{}/{}", r.target_port, r.proto);
    let mut lines = vec![headline(
        p,
        &r.time,
        "REFUSED",
        style::verdict(r.verdict),
        &workload(r.docker.container.as_ref(), r.netns),
        port,
        published(&r.docker),
        r.docker.via,
        r.verdict.as_str(),
        style::verdict(r.verdict),
        &count_mark(r),
    )];
    if let Some(c) = &r.docker.container {
        lines.push(detail(p, "container", &container_detail(c)));
    }
    let target = r
        .target_ip
        .map(|ip| endpoint(ip, r.target_port))
        .unwrap_or_else(|| format!("port {}", r.target_port));
    lines.push(detail(
        p,
        "target",
        // A namespace's own `lo`, where its forwarder dials it (rootless podman), has no bridge.
        &if r.bridge.is_empty() && r.ifindex == bindtrace_common::LOOPBACK_IFINDEX {
            format!("{target} in netns {} on lo", r.netns)
        } else {
            format!("{target} in netns {} on {} ({})", r.netns, field(&r.bridge), field(&r.veth))
        },
    ));
    lines.push(detail(p, "client", &client_detail(r)));
    if let Some(u) = &r.count_unknown {
        lines.push(detail(
            p,
            "count",
            &format!(
                "unknown: the count map was full, {} refusals overflowed since {}",
                u.overflowed, u.since
            ),
        ));
    }
    if r.count_at_least {
        lines.push(detail(p, "count", AT_LEAST_WHY));
    }
    lines.extend(listener_details(p, &r.listeners, r.listeners_omitted));
    lines.push(detail(p, "fix", &fix_text(&r.hint, r.verdict.as_str())));
    if let Some(private) = private_form(&r.docker, r.target_port) {
        lines.push(detail(p, "private", &private));
    }
    lines
}

/// A repeat of a key already shown, nothing about it changed: `TIME   again x3 web
/// 8000/tcp: loopback_only, as at TIME`.
pub(crate) fn repeat(p: Painter, r: &Report, first_time: &str) -> String {
    let count = match r.count {
        Some(n) if r.count_at_least => format!("at least x{n}"),
        Some(n) => format!("x{n}"),
        None => "x? (count map full)".into(),
    };
    let w = elide_middle(&workload(r.docker.container.as_ref(), r.netns), 40).into_owned();
    format!(
        "{}   again {count} {w} {}/{}: {}, as at {}",
        seconds(&r.time),
        r.target_port,
        r.proto,
        p.paint(style::verdict(r.verdict), r.verdict.as_str()),
        seconds(first_time)
    )
}

/// What a collapsed scan covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScanSummary {
    pub(crate) workload: String,
    pub(crate) ports: usize,
    pub(crate) lowest: u16,
    pub(crate) highest: u16,
    /// Refusals in the lines folded into the scan (not those shown above it).
    pub(crate) refusals: u64,
    /// Some of them found the count map full, or were counted from rate-limited replies (UDP on
    /// the tc hook): `refusals` is then a lower bound.
    pub(crate) count_partial: bool,
    pub(crate) shown: usize,
    pub(crate) first_time: String,
    pub(crate) last_time: String,
}

/// `TIME SCAN WORKLOAD: 1000 ports refused (1-1000), 10 shown above`, and a detail line with
/// the refusals folded into it and when.
pub(crate) fn scan(p: Painter, s: &ScanSummary) -> Vec<String> {
    let range =
        if s.lowest == s.highest { s.lowest.to_string() } else { format!("{}-{}", s.lowest, s.highest) };
    let refusals = if s.count_partial { format!("at least {}", s.refusals) } else { s.refusals.to_string() };
    let w = elide_middle(&s.workload, 40).into_owned();
    vec![
        format!(
            "{} {} {w}: {} ports refused ({range}), {} shown above",
            seconds(&s.last_time),
            p.paint(style::scan(), "SCAN"),
            s.ports,
            s.shown,
        ),
        detail(
            p,
            "scan",
            &format!(
                "{refusals} refusals of the ports not shown, from {} to {}",
                seconds(&s.first_time),
                seconds(&s.last_time)
            ),
        ),
    ]
}

/// The headline and detail lines of an audit finding.
pub(crate) fn audit(p: Painter, r: &AuditReport) -> Vec<String> {
    let extra = r.bindings.len().saturating_sub(1);
    let published = r.published.as_ref().map(|b| match extra {
        0 => endpoint(b.host_ip, b.host_port),
        n => format!("{} (+{n})", endpoint(b.host_ip, b.host_port)),
    });
    let mut lines = vec![headline(
        p,
        &r.time,
        "AUDIT",
        style::verdict_named(r.verdict),
        &escaped(&r.container.name),
        format!("{}/{}", r.target_port, r.proto),
        published,
        None,
        r.verdict,
        style::verdict_named(r.verdict),
        "",
    )];
    lines.push(detail(p, "container", &container_detail(&r.container)));
    if extra > 0 {
        let all: Vec<String> = r.bindings.iter().map(|b| endpoint(b.host_ip, b.host_port)).collect();
        lines.push(detail(p, "published", &all.join(", ")));
    }
    lines.extend(listener_details(p, &r.listeners, r.listeners_omitted));
    lines.push(detail(p, "fix", &fix_text(&r.hint, r.verdict)));
    if let Some(b) = &r.published {
        let ctx = DockerContext { published: Some(*b), ..Default::default() };
        if let Some(private) = private_form(&ctx, r.target_port) {
            lines.push(detail(p, "private", &private));
        }
    }
    lines
}

/// `TIME LOST ...`: the piped form's sentence behind a label.
pub(crate) fn lost(p: Painter, r: &LostReport) -> String {
    let text = super::text::lost(r);
    let rest = text.strip_prefix(r.time.as_str()).unwrap_or(&text).trim_start();
    let rest = rest.strip_prefix("lost ").unwrap_or(rest);
    format!("{} {} {rest}", seconds(&r.time), p.paint(style::lost(), "LOST"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        diagnose::{procfs::Holder, verdict::Verdict},
        sources::docker::Binding,
    };

    fn loopback_report(name: &str, published: &str) -> Report {
        let holder = Holder {
            pid: 4242,
            comm: "python3".into(),
            container_pid: Some(1),
            cmdline: "python3 -m http.server --bind 127.0.0.1 8000".into(),
            cmdline_truncated: 0,
            argv: vec![],
            exe: String::new(),
        };
        Report {
            time: "2026-12-03T10:51:51.123Z".into(),
            ktime_ns: Some(1),
            event: "refused",
            verdict: Verdict::LoopbackOnly,
            undiagnosed: None,
            proto: "tcp",
            family: "ipv4",
            target_ip: Some("172.17.0.2".parse().unwrap()),
            target_port: 8000,
            client_ip: Some("172.17.0.1".parse().unwrap()),
            client_port: Some(40000),
            netns: 4026532185,
            netns_cookie: 4026532185,
            bridge: "docker0".into(),
            ifindex: 2,
            veth: "veth1".into(),
            hook: "tcp-send-reset",
            listeners: vec![ListenerReport {
                ip: "127.0.0.1".parse().unwrap(),
                port: 8000,
                pids: vec![holder],
                pids_omitted: 0,
            }],
            listeners_omitted: 0,
            count: Some(3),
            count_unknown: None,
            count_at_least: false,
            hint: "python3 (pid 4242, 1 in the container) listens on 127.0.0.1:8000 only: that is the \
                   container's own loopback, which forwarded connections never reach. Bind to \
                   0.0.0.0:8000 instead: `--bind 0.0.0.0`; to keep it private, publish it on the host's \
                   loopback: -p 127.0.0.1:8080:8000"
                .into(),
            docker: DockerContext {
                container: Some(ContainerReport {
                    runtime: crate::sources::docker::Runtime::Docker,
                    id: "3f2a1b4c5d6e".into(),
                    name: name.into(),
                    image: "python:3.12-slim".into(),
                    compose_project: None,
                    compose_service: None,
                    pod: None,
                    namespace: None,
                    rootless: false,
                }),
                published: Some(Binding { host_ip: published.parse().unwrap(), host_port: 8080 }),
                via: Some(Via::DockerProxy),
                ..DockerContext::default()
            },
        }
    }

    #[test]
    fn a_refusal_has_a_short_headline_and_whole_details() {
        let lines = refusal(Painter::new(false), &loopback_report("web", "0.0.0.0"));
        assert_eq!(
            lines[0],
            "2026-12-03T10:51:51Z REFUSED web 8000/tcp on 0.0.0.0:8080 via docker-proxy: loopback_only x3"
        );
        let all = lines.join("\n");
        for part in [
            "  container web (3f2a1b4c5d6e, image python:3.12-slim)",
            "  listens   127.0.0.1:8000 python3 (pid 4242, 1 in the container): python3 -m http.server",
            "  fix       Bind to 0.0.0.0:8000 instead: `--bind 0.0.0.0`\n",
            "  private   -p 127.0.0.1:8080:8000",
            "  client    172.17.0.1:40000 via docker-proxy  (the sampled one of these 3 refusals)",
        ] {
            assert!(all.contains(part), "{part:?} in:\n{all}");
        }
        assert!(!lines.iter().any(|l| l.contains("to keep it private")), "said once, on its own line");
    }

    #[test]
    fn a_podman_container_says_so() {
        let mut r = loopback_report("web", "0.0.0.0");
        let c = r.docker.container.as_mut().unwrap();
        assert_eq!(container_detail(c), "web (3f2a1b4c5d6e, image python:3.12-slim)");
        c.runtime = crate::sources::docker::Runtime::Podman;
        assert_eq!(container_detail(c), "web (3f2a1b4c5d6e, image python:3.12-slim, podman)");
    }

    #[test]
    fn a_pre_forked_server_shows_its_command_line_once() {
        let mut r = loopback_report("web", "0.0.0.0");
        let mut worker = r.listeners[0].pids[0].clone();
        (worker.pid, worker.container_pid) = (4300, Some(7));
        r.listeners[0].pids.push(worker);
        let lines = refusal(Painter::new(false), &r);
        let listens: Vec<&String> = lines.iter().filter(|l| l.starts_with("  listens")).collect();
        assert_eq!(
            listens,
            [
                "  listens   127.0.0.1:8000 python3 (pid 4242, 1 in the container), python3 (pid 4300, 7 in the \
              container): python3 -m http.server --bind 127.0.0.1 8000"
            ]
        );
    }

    #[test]
    fn long_names_and_ipv6_are_elided_in_the_headline_only() {
        let name = format!("payments-api-{}-x2x9q", "7d9f8b6c5d".repeat(8));
        let ipv6 = "2001:db8:1234:5678:9abc:def0:1234:5678";
        let lines = refusal(Painter::new(true), &loopback_report(&name, ipv6));
        let plain = refusal(Painter::new(false), &loopback_report(&name, ipv6));
        assert!(width(&plain[0]) <= HEADLINE_COLUMNS, "{} columns: {}", width(&plain[0]), plain[0]);
        assert!(plain[0].contains('…') && plain[0].contains("x2x9q"), "{}", plain[0]);
        assert!(plain.iter().skip(1).any(|l| l.contains(&name)), "the whole name in the details");
        assert!(lines[0].contains('\u{1b}'), "coloured when asked");
        assert!(!plain.iter().any(|l| l.contains('\u{1b}')), "no escape sequence without colour");
    }

    #[test]
    fn hostile_names_are_escaped_before_they_are_measured() {
        let lines = refusal(Painter::new(false), &loopback_report("\u{1b}[2Jevil\u{202e}name", "0.0.0.0"));
        assert!(!lines.iter().any(|l| l.chars().any(crate::sinks::escape::needs_escape)), "{lines:?}");
        assert!(lines[1].contains("\\u{1b}[2Jevil\\u{202e}name"), "{}", lines[1]);
    }

    #[test]
    fn audits_and_losses_have_a_headline_too() {
        let r = loopback_report("web", "0.0.0.0");
        let b = r.docker.published.unwrap();
        let a = AuditReport {
            time: r.time.clone(),
            event: "audit",
            verdict: "loopback_only",
            proto: "tcp",
            family: "ipv4",
            target_ip: r.target_ip,
            target_port: 8000,
            netns: r.netns,
            container: r.docker.container.clone().unwrap(),
            published: Some(b),
            bindings: vec![b, Binding { host_ip: "::".parse().unwrap(), host_port: 8080 }],
            listeners: r.listeners.clone(),
            listeners_omitted: 0,
            hint: r.hint.clone(),
        };
        let lines = audit(Painter::new(false), &a);
        assert_eq!(lines[0], "2026-12-03T10:51:51Z AUDIT web 8000/tcp on 0.0.0.0:8080 (+1): loopback_only");
        assert!(lines.contains(&"  published 0.0.0.0:8080, [::]:8080".to_owned()), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("  private   -p 127.0.0.1:8080:8000")), "{lines:#?}");
        let lost = LostReport { time: r.time.clone(), event: "lost", stage: "kernel_ringbuf", count: 7 };
        assert_eq!(
            super::lost(Painter::new(false), &lost),
            "2026-12-03T10:51:51Z LOST 7 samples at stage kernel_ringbuf (their refusals are still counted \
             in the lines above and below)"
        );
    }

    /// UDP on the tc hook: every place the count shows says "at least", and why.
    #[test]
    fn a_lower_bound_says_at_least() {
        let mut r = loopback_report("dns", "0.0.0.0");
        r.proto = "udp";
        r.hook = "tc";
        r.count_at_least = true;
        let lines = refusal(Painter::new(false), &r);
        assert!(lines[0].ends_with("loopback_only at least x3"), "{lines:?}");
        assert!(lines.iter().any(|l| l.contains("(the sampled one of at least 3)")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("  count") && l.contains("rate-limits")), "{lines:?}");
        assert!(
            repeat(Painter::new(false), &r, "2026-12-03T10:51:40.000Z")
                .contains("   again at least x3 dns 8000/udp")
        );
        let text = crate::sinks::text::refusal(&r);
        assert!(text.contains("8000/udp on docker0 [at least 3]: container dns"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!((&json["count"], &json["count_at_least"]), (&3.into(), &true.into()));
        // An exact count carries no such field.
        r.count_at_least = false;
        assert!(serde_json::to_value(&r).unwrap().get("count_at_least").is_none());
    }

    #[test]
    fn repeats_and_scans_are_one_line() {
        let r = loopback_report("web", "0.0.0.0");
        assert_eq!(
            repeat(Painter::new(false), &r, "2026-12-03T10:51:40.000Z"),
            "2026-12-03T10:51:51Z   again x3 web 8000/tcp: loopback_only, as at 2026-12-03T10:51:40Z"
        );
        let s = ScanSummary {
            workload: "web".into(),
            ports: 1000,
            lowest: 1,
            highest: 1000,
            refusals: 990,
            count_partial: false,
            shown: 10,
            first_time: "2026-12-03T10:51:40.000Z".into(),
            last_time: "2026-12-03T10:51:41.000Z".into(),
        };
        let lines = scan(Painter::new(false), &s);
        assert_eq!(lines[0], "2026-12-03T10:51:41Z SCAN web: 1000 ports refused (1-1000), 10 shown above");
        assert!(
            lines[1].contains("990 refusals of the ports not shown, from 2026-12-03T10:51:40Z"),
            "{lines:?}"
        );
    }
}
