//! `bindtrace check`: a one-shot audit of every running container's published TCP ports, for
//! scripts and CI (`docker compose up -d && sudo bindtrace check`). No eBPF is loaded.
//!
//! Exit status: 0 when every published port has a listener that accepts forwarded connections,
//! 1 when any is loopback-only, 2 for other misbindings (wrong family, another address,
//! nothing listening), 3 when the check could not run (no Docker API, no privileges).
use std::{
    io::{self, Write},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    diagnose::audit,
    diagnose::namespace_reads::NamespaceReads,
    diagnose::report::{AuditReport, now_rfc3339},
    diagnose::verdict::Verdict,
    sinks::{output::Format, table::table},
    sources::docker::{self, Client},
};

pub(crate) const EXIT_REACHABLE: u8 = 0;
pub(crate) const EXIT_LOOPBACK_ONLY: u8 = 1;
pub(crate) const EXIT_MISBOUND: u8 = 2;
pub(crate) const EXIT_CANNOT_RUN: u8 = 3;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CheckArgs {
    /// Containers to check, by name or id prefix (default: every running container).
    #[arg(value_name = "CONTAINER")]
    pub(crate) containers: Vec<String>,

    /// Output format: a table, or one JSON document.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,

    /// Docker API socket, or podman's compatible one (unix:///path or a path; default:
    /// $DOCKER_HOST, else /var/run/docker.sock, else /run/podman/podman.sock when only it exists).
    #[arg(long, value_name = "SOCKET")]
    pub(crate) docker_host: Option<String>,

    /// A container younger than this may still be starting: its ports without a listener are
    /// looked at again until it is this old before they count as "nothing listens".
    #[arg(long, value_name = "DURATION", default_value = audit::DEFAULT_GRACE, value_parser = humantime::parse_duration)]
    pub(crate) audit_grace: Duration,
}

#[derive(Serialize)]
struct JsonDoc<'a> {
    time: String,
    exit_code: u8,
    containers: usize,
    ports: &'a [AuditReport],
    errors: &'a [String],
}

/// Runs the check, writes the result to `out`, and returns the exit status.
pub(crate) async fn run<W: Write>(args: &CheckArgs, out: &mut W) -> u8 {
    let socket = match docker::socket_path(args.docker_host.as_deref()) {
        Ok(s) => s,
        Err(e) => return cannot_run(&e),
    };
    let client = Client::new(socket);
    let inv = match docker::snapshot(&client).await {
        Ok(inv) => inv,
        Err(e) => return cannot_run(&format!("{e}")),
    };
    let mut containers: Vec<_> = inv.containers.values().cloned().collect();
    if !args.containers.is_empty() {
        for wanted in &args.containers {
            if !containers.iter().any(|c| matches(c, wanted)) {
                return cannot_run(&format!("no running container named {wanted}"));
            }
        }
        containers.retain(|c| args.containers.iter().any(|w| matches(c, w)));
    }
    containers.sort_by(|a, b| a.name.cmp(&b.name));

    let mut rows: Vec<AuditReport> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut checked = 0;
    for c in containers.iter().filter(|c| c.owns_netns() && c.published().next().is_some()) {
        checked += 1;
        check_container(c, args.audit_grace, &mut rows, &mut errors).await;
    }

    let code = exit_code(&rows, &errors);
    let written = match args.format {
        Format::Json => serde_json::to_writer(
            &mut *out,
            &JsonDoc {
                time: now_rfc3339(),
                exit_code: code,
                containers: checked,
                ports: &rows,
                errors: &errors,
            },
        )
        .map_err(io::Error::from)
        .and_then(|()| writeln!(out)),
        Format::Text => write!(out, "{}", table(&rows, checked)),
    };
    for e in &errors {
        eprintln!("bindtrace check: {}", crate::sinks::escape::escaped(e));
    }
    if let Err(e) = written.and_then(|()| out.flush()) {
        eprintln!("bindtrace check: writing the result: {e}");
        return EXIT_CANNOT_RUN;
    }
    code
}

/// Audits every published TCP and UDP port of `c`, waiting out the grace period for ports nothing
/// listens on yet; a row per port, or an error per port that could not be read.
async fn check_container(
    c: &docker::Container,
    grace: Duration,
    rows: &mut Vec<AuditReport>,
    errors: &mut Vec<String>,
) {
    let ns = match audit::open_netns(c) {
        Ok(ns) => ns,
        Err(e) => return errors.push(namespace_error(&c.name, &e)),
    };
    let deadline = audit::deadline(c, grace, Instant::now());
    // Each address family a port is published on is a row: IPv6 clients reach the container's
    // IPv6 address, which a listener on 0.0.0.0 does not take.
    for mapping in c.published() {
        for target in audit::targets_or_none(c, mapping) {
            let check = loop {
                // A fresh read each time: the service may have started listening meanwhile.
                match audit::check_port(mapping, target, &ns, &mut NamespaceReads::default()) {
                    Ok(check) if check.verdict == Some(Verdict::NoListener) && Instant::now() < deadline => {
                        tokio::time::sleep(audit::POLL).await;
                    }
                    other => break other,
                }
            };
            match check {
                Ok(check) => rows.push(audit::report(c, &check, ns.inode)),
                Err(e) => errors.push(namespace_error(&c.name, &e)),
            }
        }
    }
}

fn cannot_run(why: &str) -> u8 {
    eprintln!("bindtrace check: cannot run: {}", crate::sinks::escape::escaped(why));
    EXIT_CANNOT_RUN
}

fn namespace_error(name: &str, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::EPERM) {
        format!(
            "{name}: entering its network namespace needs root (CAP_SYS_ADMIN): run `sudo bindtrace check`"
        )
    } else {
        format!("{name}: reading its listeners: {e}")
    }
}

fn matches(c: &docker::Container, wanted: &str) -> bool {
    c.name == wanted.trim_start_matches('/') || (wanted.len() >= 4 && c.id.starts_with(wanted))
}

pub(crate) fn exit_code(rows: &[AuditReport], errors: &[String]) -> u8 {
    if !errors.is_empty() {
        EXIT_CANNOT_RUN
    } else if rows.iter().any(|r| r.verdict == Verdict::LoopbackOnly.as_str()) {
        EXIT_LOOPBACK_ONLY
    } else if rows.iter().any(|r| r.verdict != "ok") {
        EXIT_MISBOUND
    } else {
        EXIT_REACHABLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnose::report::ContainerReport;

    fn row(name: &str, verdict: &'static str) -> AuditReport {
        AuditReport {
            time: "t".into(),
            event: "audit",
            verdict,
            proto: "tcp",
            family: "ipv4",
            target_ip: Some("172.17.0.2".parse().unwrap()),
            target_port: 8000,
            netns: 1,
            container: ContainerReport {
                runtime: crate::sources::docker::Runtime::Docker,
                id: "abc".into(),
                name: name.into(),
                image: "img".into(),
                compose_project: None,
                compose_service: None,
                pod: None,
                namespace: None,
            },
            published: None,
            bindings: vec![docker::Binding { host_ip: "0.0.0.0".parse().unwrap(), host_port: 8000 }],
            listeners: vec![],
            listeners_omitted: 0,
            hint: "fix it".into(),
        }
    }

    #[test]
    fn exit_codes_rank_loopback_first() {
        assert_eq!(exit_code(&[row("a", "ok")], &[]), 0);
        assert_eq!(exit_code(&[row("a", "ok"), row("b", "no_listener")], &[]), 2);
        assert_eq!(exit_code(&[row("a", "no_listener"), row("b", "loopback_only")], &[]), 1);
        assert_eq!(exit_code(&[row("a", "loopback_only")], &["x".into()]), 3);
        assert_eq!(exit_code(&[], &[]), 0);
    }

    #[test]
    fn table_lines_up() {
        let t = table(&[row("demo-app", "loopback_only"), row("web", "ok")], 2);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("CONTAINER  PORT      PUBLISHED     LISTENING  VERDICT"), "{t}");
        assert!(lines[1].starts_with("demo-app   8000/tcp  0.0.0.0:8000  -          loopback_only"), "{t}");
        assert!(t.contains("demo-app 8000/tcp: loopback_only: fix it"), "{t}");
        assert!(t.ends_with("2 published ports in 2 containers: 1 reachable, 1 not\n"), "{t}");
    }

    #[test]
    fn a_port_published_over_tcp_and_udp_is_two_ports() {
        let mut udp = row("dns", "loopback_only");
        udp.proto = "udp";
        let t = table(&[row("dns", "ok"), udp], 1);
        assert!(t.contains("dns        8000/udp  0.0.0.0:8000  -          loopback_only"), "{t}");
        assert!(t.contains("dns 8000/udp: loopback_only: fix it"), "{t}");
        assert!(t.ends_with("2 published ports in 1 container: 1 reachable, 1 not\n"), "{t}");
    }
}
