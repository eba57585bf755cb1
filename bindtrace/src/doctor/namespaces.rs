//! Whether bindtrace sees the host through the namespaces it runs in: a container without
//! `--pid host` cannot read containers' /proc/PID/ns/net, one without `--network host` sees no
//! bridge of the host's.
use std::os::unix::fs::MetadataExt as _;

use crate::doctor::report::Check;

/// What a container's own first process is called, when `docker run --init`, podman or a
/// minimal init starts the image (bindtrace itself when it is the entry point).
const CONTAINER_INITS: [&str; 6] =
    ["bindtrace", "docker-init", "tini", "dumb-init", "catatonit", "s6-svscan"];

/// Files container runtimes leave in a container's root.
const CONTAINER_MARKERS: [&str; 2] = ["/.dockerenv", "/run/.containerenv"];

#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    pub(crate) own_pid: u32,
    pub(crate) pid1_comm: Option<String>,
    /// The Docker API socket and the pid SO_PEERCRED gave for it (0: outside our pid
    /// namespace); None when no daemon answered.
    pub(crate) daemon: Option<(String, u32)>,
    pub(crate) own_net: Option<u64>,
    /// The network namespace of the daemon (its bridges are there).
    pub(crate) daemon_net: Option<u64>,
    pub(crate) pid1_net: Option<u64>,
    pub(crate) bridges_here: Vec<String>,
    pub(crate) container_marker: Option<&'static str>,
}

impl Facts {
    pub(crate) fn gather(daemon: Option<(String, u32)>, bridges_here: Vec<String>) -> Facts {
        let net_of = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino());
        Facts {
            own_pid: std::process::id(),
            pid1_comm: std::fs::read_to_string("/proc/1/comm").ok().map(|s| s.trim_end().to_owned()),
            daemon_net: daemon
                .as_ref()
                .filter(|(_, pid)| *pid > 0)
                .and_then(|(_, pid)| net_of(&pid.to_string())),
            daemon,
            own_net: net_of("self"),
            pid1_net: net_of("1"),
            bridges_here,
            container_marker: CONTAINER_MARKERS.into_iter().find(|p| std::path::Path::new(p).exists()),
        }
    }

    /// Whether our pid namespace is a container's own: we are its pid 1, or pid 1 is an init
    /// that only containers run.
    fn own_pid_namespace(&self) -> Option<String> {
        if self.own_pid == 1 {
            return Some("bindtrace is pid 1 of its pid namespace".into());
        }
        let comm = self.pid1_comm.as_deref()?;
        CONTAINER_INITS.contains(&comm).then(|| format!("pid 1 here is {comm}, a container's init"))
    }
}

const PID_HOST: &str = "run bindtrace's container with --pid host (docker run --pid host, Compose pid: host)";
const NETWORK_HOST: &str =
    "run bindtrace's container with --network host (docker run --network host, Compose network_mode: host)";

pub(crate) fn pid_check(f: &Facts) -> Check {
    const NAME: &str = "pid_namespace";
    if let Some((socket, 0)) = &f.daemon {
        return Check::fail(
            NAME,
            format!(
                "the Docker daemon at {socket} is outside this pid namespace (SO_PEERCRED reports pid 0): \
                 containers' /proc/PID/ns/net cannot be reached from here"
            ),
            PID_HOST,
        );
    }
    if let Some(why) = f.own_pid_namespace() {
        return Check::fail(NAME, format!("{why}: a container without the host's pids"), PID_HOST);
    }
    match (&f.daemon, &f.pid1_comm) {
        (Some((_, pid)), _) => {
            Check::ok(NAME, format!("the Docker daemon (pid {pid}) is in this pid namespace"))
        }
        (None, Some(comm)) => Check::ok(NAME, format!("pid 1 is {comm}, not a container's init")),
        (None, None) => Check::ok(NAME, "pid 1 cannot be read; no sign of a container's own pid namespace"),
    }
}

pub(crate) fn network_check(f: &Facts) -> Check {
    const NAME: &str = "network_namespace";
    if let (Some(own), Some(theirs)) = (f.own_net, f.daemon_net) {
        return if own == theirs {
            Check::ok(NAME, "the Docker daemon's network namespace, where its bridges are")
        } else {
            Check::fail(
                NAME,
                format!(
                    "not the Docker daemon's network namespace (net:[{own}], the daemon's net:[{theirs}]): its bridges are elsewhere"
                ),
                NETWORK_HOST,
            )
        };
    }
    // pid 1 is the host's when our pid namespace is not a container's own.
    if let (Some(own), Some(host), None) = (f.own_net, f.pid1_net, f.own_pid_namespace()) {
        return if own == host {
            Check::ok(NAME, "pid 1's network namespace")
        } else {
            Check::fail(
                NAME,
                format!("not pid 1's network namespace (net:[{own}], pid 1's net:[{host}])"),
                NETWORK_HOST,
            )
        };
    }
    let in_container = f.container_marker.is_some() || f.own_pid_namespace().is_some();
    match (f.bridges_here.is_empty(), in_container) {
        (false, _) => Check::ok(NAME, format!("bridges here: {}", f.bridges_here.join(", "))),
        (true, true) => Check::fail(
            NAME,
            "no bridge in this network namespace, and this is a container: it has a network of its own",
            NETWORK_HOST,
        ),
        (true, false) => Check::ok(NAME, "no sign of a container's own network namespace"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    fn host() -> Facts {
        Facts {
            own_pid: 4242,
            pid1_comm: Some("systemd".into()),
            daemon: Some(("/var/run/docker.sock".into(), 900)),
            own_net: Some(1),
            daemon_net: Some(1),
            pid1_net: Some(1),
            bridges_here: vec!["docker0".into()],
            container_marker: None,
        }
    }

    #[test]
    fn the_host_is_ready() {
        assert_eq!(pid_check(&host()).status, Status::Ok);
        assert_eq!(network_check(&host()).status, Status::Ok);
    }

    /// `docker run` without --pid host: the daemon is invisible (pid 0) and we are pid 1.
    #[test]
    fn a_container_without_pid_host_names_the_flag() {
        let f = Facts {
            own_pid: 1,
            pid1_comm: Some("bindtrace".into()),
            daemon: Some(("/var/run/docker.sock".into(), 0)),
            daemon_net: None,
            ..host()
        };
        let c = pid_check(&f);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("pid 0") && c.remedy.unwrap().contains("--pid host"));
        // Without the Docker socket, pid 1 gives it away.
        let c = pid_check(&Facts { daemon: None, ..f.clone() });
        assert!(c.detail.contains("pid 1") && c.remedy.unwrap().contains("--pid host"), "{:?}", c.detail);
        let c = pid_check(&Facts { own_pid: 7, pid1_comm: Some("docker-init".into()), daemon: None, ..f });
        assert_eq!(c.status, Status::Fail);
    }

    #[test]
    fn a_container_without_network_host_names_the_flag() {
        // --pid host: the daemon's namespace differs from ours.
        let c = network_check(&Facts { own_net: Some(2), ..host() });
        assert_eq!(c.status, Status::Fail);
        assert!(c.remedy.unwrap().contains("--network host"));
        // No daemon to compare with, but pid 1 (the host's) is elsewhere.
        let c = network_check(&Facts { daemon: None, daemon_net: None, own_net: Some(2), ..host() });
        assert_eq!(c.status, Status::Fail);
        // Neither --pid host nor --network host: only the missing bridges tell.
        let boxed = Facts {
            own_pid: 1,
            pid1_comm: Some("bindtrace".into()),
            daemon: Some(("/var/run/docker.sock".into(), 0)),
            daemon_net: None,
            pid1_net: Some(2),
            own_net: Some(2),
            bridges_here: vec![],
            container_marker: Some("/.dockerenv"),
        };
        let c = network_check(&boxed);
        assert_eq!(c.status, Status::Fail);
        assert!(c.remedy.unwrap().contains("--network host"));
        // ... and with --network host there are bridges.
        let c = network_check(&Facts { bridges_here: vec!["docker0".into()], ..boxed });
        assert_eq!(c.status, Status::Ok);
    }

    /// A host whose pid 1 cannot be read (as on hardened or sandboxed machines) and that has
    /// the marker file of a container image is still judged by the daemon it shares.
    #[test]
    fn the_daemon_outweighs_markers() {
        let f = Facts { pid1_comm: None, pid1_net: None, container_marker: Some("/.dockerenv"), ..host() };
        assert_eq!(pid_check(&f).status, Status::Ok);
        assert_eq!(network_check(&f).status, Status::Ok);
    }
}
