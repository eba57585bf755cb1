//! This process and this network namespace: each capability set-up needs, the bridges and the
//! workloads on them, and whether the metrics port is free.
use std::net::SocketAddr;

use crate::{
    doctor::{report::Check, runtimes::Summary},
    kernel::privileges::{self, Needed},
    netns::links::Link,
    sinks::metrics,
};

/// One line per capability, from the effective set `eff` (CapEff of /proc/self/status).
pub(crate) fn capability_checks(eff: u64) -> Vec<Check> {
    privileges::each_needed(eff).iter().map(capability_check).collect()
}

fn capability_check(n: &Needed) -> Check {
    let name = capability_check_name(n.name);
    if n.held {
        return Check::ok(name, format!("{}: to {}", n.name, n.why));
    }
    if n.covered_by_sys_admin {
        return Check::ok(name, format!("{} missing, CAP_SYS_ADMIN stands in for it: to {}", n.name, n.why));
    }
    let flag = n.name.trim_start_matches("CAP_");
    let container = match flag {
        "BPF" | "PERFMON" => {
            format!("--cap-add {flag} (Engines that know it; SYS_ADMIN covers it on Docker 20.10)")
        }
        _ => format!("--cap-add {flag}"),
    };
    Check::fail(
        name,
        format!("{} missing: needed to {}", n.name, n.why),
        format!("run as root (`sudo bindtrace`); in a container {container}, or --privileged"),
    )
}

/// `cap_bpf` for CAP_BPF: check names are stable and lower case.
fn capability_check_name(cap: &str) -> &'static str {
    match cap {
        "CAP_BPF" => "cap_bpf",
        "CAP_PERFMON" => "cap_perfmon",
        "CAP_NET_ADMIN" => "cap_net_admin",
        "CAP_SYS_ADMIN" => "cap_sys_admin",
        "CAP_SYS_PTRACE" => "cap_sys_ptrace",
        _ => "capability",
    }
}

/// Bridges of this namespace and how many veth ports each has (one per attached container).
pub(crate) fn bridges(links: &[Link]) -> Vec<(String, usize)> {
    links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("bridge"))
        .map(|b| {
            let ports = links
                .iter()
                .filter(|l| l.master == Some(b.ifindex) && l.kind.as_deref() == Some("veth"))
                .count();
            (b.name.clone(), ports)
        })
        .collect()
}

/// Without `-i`, bindtrace starts with docker0, or with none when the Docker API will name
/// the bridges; without either it refuses to start.
pub(crate) fn bridges_check(links: &Result<Vec<Link>, String>, runtime_api: bool) -> Check {
    const NAME: &str = "bridges";
    let links = match links {
        Ok(l) => l,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("reading network interfaces (rtnetlink): {e}"),
                "see the network_namespace line",
            );
        }
    };
    let found = bridges(links);
    if found.is_empty() {
        return if runtime_api {
            Check::warn(
                NAME,
                "no bridge in this network namespace yet: bindtrace attaches the runtime's networks as they appear",
                "create a network or start a container; see the network_namespace line",
            )
        } else {
            Check::fail(
                NAME,
                "no bridge in this network namespace and no runtime API: bindtrace without -i has nothing to watch",
                "start Docker, point --docker-host at its socket, or name the bridges with -i",
            )
        };
    }
    let list: Vec<String> = found.iter().map(|(name, ports)| format!("{name} ({ports} ports)")).collect();
    Check::ok(NAME, list.join(", "))
}

/// What the runtimes run and what the bridges carry.
pub(crate) fn workloads_check(
    runtimes: &[(&str, Option<&[Summary]>)],
    links: &Result<Vec<Link>, String>,
) -> Check {
    const NAME: &str = "workloads";
    let ports: usize = links.as_ref().map(|l| bridges(l).iter().map(|(_, n)| n).sum()).unwrap_or(0);
    let mut parts: Vec<String> = Vec::new();
    for (runtime, containers) in runtimes {
        let Some(list) = containers else { continue };
        let published = |proto: &str| -> usize {
            list.iter()
                .map(|c| c.ports.iter().filter(|p| p.proto == proto && p.public_port.is_some()).count())
                .sum()
        };
        parts.push(format!(
            "{runtime}: {}, {}, {}",
            counted(list.len(), "running container"),
            counted(published("tcp"), "published TCP port"),
            counted(published("udp"), "published UDP port")
        ));
    }
    parts.push(format!("{} on the bridges", counted(ports, "container interface")));
    Check::ok(NAME, parts.join("; "))
}

/// `1 port`, `2 ports`.
fn counted(n: usize, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

/// The bind set-up does first: a port in use stops bindtrace before anything is loaded.
pub(crate) fn metrics_check(addr: Option<SocketAddr>) -> Check {
    const NAME: &str = "metrics_port";
    let Some(addr) = addr else { return Check::skip(NAME, "--no-metrics") };
    match metrics::bind(addr) {
        Ok(listener) => {
            drop(listener);
            Check::ok(NAME, format!("{addr} is free"))
        }
        Err(e) => {
            Check::fail(NAME, e.to_string(), "--metrics-addr IP:PORT with a free port, or --no-metrics")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    #[test]
    fn each_capability_has_its_line() {
        let none = capability_checks(0);
        assert_eq!(none.len(), 5);
        assert!(none.iter().all(|c| c.status == Status::Fail));
        assert!(none[0].detail.starts_with("CAP_BPF missing"), "{}", none[0].detail);
        assert!(none[2].remedy.as_deref().unwrap().contains("--cap-add NET_ADMIN"));
        assert!(capability_checks(u64::MAX).iter().all(|c| c.status == Status::Ok));
        // Docker 20.10's least-privilege line: SYS_ADMIN stands in for BPF and PERFMON.
        let least = (1 << 12) | (1 << 19) | (1 << 21);
        let c = capability_checks(least);
        assert!(c.iter().all(|c| c.status == Status::Ok), "{c:?}");
        assert!(c[0].detail.contains("stands in"));
    }

    fn link(ifindex: u32, name: &str, kind: &str, master: Option<u32>) -> Link {
        Link {
            ifindex,
            name: name.into(),
            kind: Some(kind.into()),
            master,
            peer_ifindex: None,
            peer_netnsid: None,
            up: true,
        }
    }

    #[test]
    fn bridges_and_their_ports() {
        let links = Ok(vec![
            link(3, "docker0", "bridge", None),
            link(4, "br-1a2b", "bridge", None),
            link(5, "veth1", "veth", Some(4)),
            link(6, "veth2", "veth", Some(4)),
            link(7, "dummy0", "dummy", Some(3)),
        ]);
        let c = bridges_check(&links, true);
        assert_eq!(c.detail, "docker0 (0 ports), br-1a2b (2 ports)");
        assert_eq!(bridges_check(&Ok(vec![]), true).status, Status::Warn);
        assert_eq!(bridges_check(&Ok(vec![]), false).status, Status::Fail);
        let list: Vec<Summary> = serde_json::from_str(
            r#"[{"Names":["/a"],"Ports":[{"PublicPort":8080,"Type":"tcp"},{"PublicPort":53,"Type":"udp"}]},{"Names":["/b"]}]"#,
        )
        .unwrap();
        let w = workloads_check(&[("docker", Some(&list)), ("podman", None)], &links);
        assert_eq!(
            w.detail,
            "docker: 2 running containers, 1 published TCP port, 1 published UDP port; 2 container interfaces on the bridges"
        );
    }

    #[test]
    fn a_port_in_use_fails() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let c = metrics_check(Some(addr));
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("already in use"), "{}", c.detail);
        drop(held);
        assert_eq!(metrics_check(None).status, Status::Skip);
    }
}
