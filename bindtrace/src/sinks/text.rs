//! The text form of each record: one line a person can read and grep. Every value that comes
//! from outside (names, images, process names, bridges and veths, hints quoting command lines)
//! goes through [`escape`](super::escape) first.
use super::escape::{escaped, field};
use crate::{
    diagnose::hint::endpoint,
    diagnose::report::{AuditReport, DockerContext, LostReport, Report, Via},
};

/// `TIME refused CLIENT -> TARGET/tcp on BRIDGE [xN]: VERDICT: HINT` (`[at least N]` when the
/// count is a lower bound)
pub(crate) fn refusal(r: &Report) -> String {
    let client = match (r.client_ip, r.client_port) {
        (Some(ip), Some(port)) => endpoint(ip, port),
        _ => "?".into(),
    };
    let target = match r.target_ip {
        Some(ip) => endpoint(ip, r.target_port),
        None => format!("port {}", r.target_port),
    };
    let count = match (r.count, &r.count_unknown) {
        // UDP on the tc hook: the port unreachables it counts are rate-limited by the kernel.
        (Some(n), _) if r.count_at_least => format!(" [at least {n}]"),
        (Some(n), _) if n > 1 => format!(" [x{n}]"),
        (Some(_), _) => String::new(),
        (None, Some(u)) => {
            format!(" [count unknown: map full, {} refusals overflowed since {}]", u.overflowed, u.since)
        }
        (None, None) => " [count unknown]".into(),
    };
    match &r.docker.container {
        // `TIME refused CLIENT -> TARGET/tcp on BRIDGE [xN]: container NAME (ID, image IMG)
        //  port P published on H:P via HOW: VERDICT: HINT`
        Some(c) => format!(
            "{} refused {client} -> {target}/{} on {}{count}: container {} ({}, image {}){}: {}: {}",
            r.time,
            r.proto,
            field(&r.bridge),
            field(&c.name),
            field(&c.id),
            field(&c.image),
            how(&r.docker),
            r.verdict.as_str(),
            escaped(&r.hint)
        ),
        None => format!(
            "{} refused {client} -> {target}/{} on {} (netns {}){count}{}: {}: {}",
            r.time,
            r.proto,
            field(&r.bridge),
            r.netns,
            how(&r.docker),
            r.verdict.as_str(),
            escaped(&r.hint)
        ),
    }
}

/// `, published on 0.0.0.0:8000 via docker-proxy (pid 12)`, `, via direct from curl (pid 9)`...
fn how(d: &DockerContext) -> String {
    let mut s = String::new();
    if let Some(p) = &d.published {
        s.push_str(&format!(", published on {}", endpoint(p.host_ip, p.host_port)));
    }
    let Some(via) = d.via else { return s };
    s.push_str(&format!(" via {}", via.as_str()));
    match via {
        Via::DockerProxy | Via::Rootlessport => {
            if let Some(p) = &d.client_process {
                s.push_str(&format!(" (pid {})", p.pid));
            }
        }
        // RootlessKit's port driver accepted; its docker-proxy dialed the container.
        Via::Rootlesskit => {
            if let Some(p) = &d.client_process {
                s.push_str(&format!(" ({} pid {} in RootlessKit's namespace)", p.comm, p.pid));
            }
        }
        Via::Dnat => {
            if let Some(o) = &d.original {
                s.push_str(&format!(
                    " from {} to {}",
                    endpoint(o.client_ip, o.client_port),
                    endpoint(o.target_ip, o.target_port)
                ));
            }
        }
        Via::Direct => {
            let mut from = Vec::new();
            if let Some(p) = &d.client_process {
                from.push(format!("{} (pid {})", field(&p.comm), p.pid));
            }
            if let Some(c) = &d.client_container {
                from.push(format!("in container {}", field(&c.name)));
            }
            if !from.is_empty() {
                s.push_str(&format!(" from {}", from.join(" ")));
            }
        }
    }
    s
}

/// `TIME audit container NAME (ID, image IMG) port P/tcp published on H:P: VERDICT: HINT`
pub(crate) fn audit(r: &AuditReport) -> String {
    let published: Vec<String> = r.bindings.iter().map(|b| endpoint(b.host_ip, b.host_port)).collect();
    format!(
        "{} audit container {} ({}, image {}) port {}/{} published on {}: {}: {}",
        r.time,
        field(&r.container.name),
        field(&r.container.id),
        field(&r.container.image),
        r.target_port,
        r.proto,
        published.join(", "),
        r.verdict,
        escaped(&r.hint)
    )
}

/// `TIME lost N samples at stage S (...)`, or what the kernel's skipped invocations mean.
pub(crate) fn lost(r: &LostReport) -> String {
    if r.stage == "kernel_recursion" {
        format!(
            "{} the kernel skipped the hook {} times because it was already running on that CPU: \
             refusals among those are not counted (counts since then are lower bounds)",
            r.time, r.count
        )
    } else {
        format!(
            "{} lost {} samples at stage {} (their refusals are still counted in the lines above and below)",
            r.time, r.count, r.stage
        )
    }
}
