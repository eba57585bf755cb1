//! `bindtrace check`: a one-shot audit of every running container's published TCP ports, for
//! scripts and CI (`docker compose up -d && sudo bindtrace check`). No eBPF is loaded.
//!
//! Exit status: 0 when every published port has a listener that accepts forwarded connections,
//! 1 when any is loopback-only, 2 for other misbindings (wrong family, another address,
//! nothing listening), 3 when the check could not run (no runtime API answered, no privileges,
//! an ambiguous name), 4 when a named container or pod is not running.
//!
//! Every runtime is consulted, as the daemon follows them: each socket `--docker-host` names,
//! else Docker's and podman's that exist (each user's podman and rootless Docker socket under
//! /run/user too), and containerd's state directory (nerdctl's published ports; pods by name).
//! One that does not answer is an error (exit 3), but the others' containers are still checked
//! and shown.
use std::{
    io::{self, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    diagnose::audit,
    diagnose::namespace_reads::NamespaceReads,
    diagnose::report::{AuditReport, now_rfc3339},
    diagnose::verdict::Verdict,
    sinks::{output::Format, table::table},
    sources::docker::{self, Client, Container},
};

use super::check_names::{self, LookupError, Wanted};

pub(crate) const EXIT_REACHABLE: u8 = 0;
pub(crate) const EXIT_LOOPBACK_ONLY: u8 = 1;
pub(crate) const EXIT_MISBOUND: u8 = 2;
pub(crate) const EXIT_CANNOT_RUN: u8 = 3;
/// A container or pod named on the command line is not running in any runtime consulted.
pub(crate) const EXIT_NOT_FOUND: u8 = 4;

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CheckArgs {
    /// Containers to check (default: every running container): `docker:NAME`, `podman:NAME`,
    /// `k8s:NAMESPACE/POD`, or a bare name or id prefix, looked up in every runtime (a name
    /// two runtimes use is an error listing both).
    #[arg(value_name = "CONTAINER")]
    pub(crate) containers: Vec<String>,

    /// Output format: a table, or one JSON document.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,

    /// Docker API socket, or podman's compatible one (unix:///path or a path; repeatable;
    /// default: $DOCKER_HOST, else each of /var/run/docker.sock and /run/podman/podman.sock
    /// that exists).
    #[arg(long, value_name = "SOCKET")]
    pub(crate) docker_host: Vec<String>,

    /// A container younger than this may still be starting: its ports without a listener are
    /// looked at again until it is this old before they count as "nothing listens".
    #[arg(long, value_name = "DURATION", default_value = audit::DEFAULT_GRACE, value_parser = humantime::parse_duration)]
    pub(crate) audit_grace: Duration,

    /// containerd's task state directory, read for nerdctl containers and Kubernetes pods
    /// (as the daemon reads it; absent is no containerd).
    #[arg(long, value_name = "DIR", default_value = crate::sources::containerd::DEFAULT_STATE_DIR)]
    pub(crate) containerd_state: PathBuf,
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
    let wanted: Vec<Wanted> = match args.containers.iter().map(|a| Wanted::parse(a)).collect() {
        Ok(w) => w,
        Err(e) => return cannot_run(&e),
    };
    let (sockets, user_sockets) = match docker::socket_plan(&args.docker_host, None) {
        Ok((sockets, watched)) => with_present(sockets, watched.map(|p| p.sockets()).unwrap_or_default()),
        Err(e) => return cannot_run(&e),
    };
    let (mut all, mut answered, mut errors) = inventories(sockets).await;
    if let Some(workloads) = containerd_workloads(args.containerd_state.clone()).await {
        answered += 1;
        all.extend(workloads);
    }
    // A user's socket found only by the scan may be a leftover of a session that ended: it is
    // said, not an error (named and default sockets are).
    let (stale_users, real): (Vec<String>, Vec<String>) = errors
        .drain(..)
        .partition(|e| user_sockets.iter().any(|u| e.starts_with(&format!("{}:", u.display()))));
    errors = real;
    for e in &stale_users {
        eprintln!(
            "bindtrace check: skipping a user's socket (podman or rootless Docker) that does not answer: {}",
            crate::sinks::escape::escaped(e)
        );
    }
    if answered == 0 {
        return cannot_run(&errors.join("; "));
    }
    let mut containers = match pick(&all, &wanted) {
        Ok(c) => c,
        // A runtime that did not answer may hold it: that is the error then.
        Err(e) if !errors.is_empty() => return cannot_run(&format!("{e}; and {}", errors.join("; "))),
        Err(e @ LookupError::NotFound(_)) => {
            eprintln!("bindtrace check: {}", crate::sinks::escape::escaped(&e.to_string()));
            return EXIT_NOT_FOUND;
        }
        Err(e) => return cannot_run(&e.to_string()),
    };
    containers.sort_by(|a, b| (&a.name, a.runtime.as_str()).cmp(&(&b.name, b.runtime.as_str())));

    let mut rows: Vec<AuditReport> = Vec::new();
    let mut checked = 0;
    for c in containers.iter().filter(|c| c.owns_netns()) {
        if c.published().next().is_none() {
            // Asked for by name, it must not pass in silence: say why nothing was audited.
            if !wanted.is_empty() {
                eprintln!("bindtrace check: {}", nothing_published(c));
            }
            continue;
        }
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

/// Every runtime's running containers (one snapshot per socket, all at once so that one that
/// hangs costs its timeout once), how many runtimes answered, and an error for each socket that
/// did not.
async fn inventories(sockets: Vec<PathBuf>) -> (Vec<Container>, usize, Vec<String>) {
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            tokio::spawn(async move {
                let client = Client::new(socket.clone());
                docker::snapshot(&client).await.map_err(|e| format!("{}: {e}", socket.display()))
            })
        })
        .collect();
    let (mut containers, mut answered, mut errors) = (Vec::new(), 0, Vec::new());
    for task in tasks {
        match task.await {
            Ok(Ok(inv)) => {
                answered += 1;
                containers.extend(inv.containers.values().map(|c| (**c).clone()));
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("reading a runtime: {e}")),
        }
    }
    (containers, answered, errors)
}

/// containerd's workloads (nerdctl containers, pods), read from its state directory as the
/// daemon reads it; None when there is no such directory (no containerd, not an error).
async fn containerd_workloads(dir: PathBuf) -> Option<Vec<Container>> {
    use crate::sources::containerd::{state, workloads};
    tokio::task::spawn_blocking(move || dir.is_dir().then(|| workloads::group(&state::read(&dir).tasks)))
        .await
        .ok()
        .flatten()
}

/// Why a named workload has no row: what it publishes is not known, or it publishes nothing.
fn nothing_published(c: &Container) -> String {
    let name = crate::sinks::escape::escaped(&check_names::Named::qualified(c)).into_owned();
    if c.pod.is_some() {
        format!(
            "{name}: no published ports known (a pod's ports are in its spec on the API server, \
             not in containerd's state): nothing audited; its refusals are reported by `sudo bindtrace`"
        )
    } else {
        format!("{name}: publishes no port: nothing audited")
    }
}

/// The sockets to read: those named or found by default, and, as the daemon would follow
/// them, the podman sockets of its watched run directory that exist now (each user's); and
/// which of them only that scan found.
fn with_present(mut sockets: Vec<PathBuf>, present: Vec<PathBuf>) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let scanned: Vec<PathBuf> = present.into_iter().filter(|s| !sockets.contains(s)).collect();
    sockets.extend(scanned.iter().cloned());
    (sockets, scanned)
}

/// The containers the names pick (every one when no name is given), each once.
fn pick(all: &[Container], wanted: &[Wanted]) -> Result<Vec<Container>, LookupError> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    let mut picked: Vec<Container> = Vec::new();
    for w in wanted {
        for c in check_names::lookup(w, all)? {
            if !picked.iter().any(|p| p.runtime == c.runtime && p.id == c.id) {
                picked.push(c.clone());
            }
        }
    }
    Ok(picked)
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
                rootless: false,
            },
            published: None,
            bindings: vec![docker::Binding { host_ip: "0.0.0.0".parse().unwrap(), host_port: 8000 }],
            listeners: vec![],
            listeners_omitted: 0,
            hint: "fix it".into(),
        }
    }

    #[test]
    fn a_users_socket_found_by_the_scan_is_added_once() {
        let p = |s: &str| PathBuf::from(s);
        let (all, scanned) =
            with_present(vec![p("/d.sock"), p("/u/1/p.sock")], vec![p("/u/1/p.sock"), p("/u/2/p.sock")]);
        assert_eq!(all, vec![p("/d.sock"), p("/u/1/p.sock"), p("/u/2/p.sock")]);
        assert_eq!(scanned, vec![p("/u/2/p.sock")]);
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
