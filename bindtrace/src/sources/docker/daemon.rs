//! The Docker daemon as a process, so that its userland proxy can be told from an impostor.
//!
//! A container can run a process called `docker-proxy`, even from a file at
//! `/usr/bin/docker-proxy` (its own, in its own mount namespace), with `-host-port` in its
//! arguments. None of that is proof. A process is the daemon's proxy when all of these hold:
//! - its executable is the daemon's proxy binary, compared by (device, inode) with the file
//!   the daemon would run, resolved inside the daemon's own root (`/proc/<daemon>/root`): its
//!   `--userland-proxy-path`, else `docker-proxy` where Docker's packages install it;
//! - its parent is the daemon (for a rootless daemon, also RootlessKit's
//!   `rootlesskit-docker-proxy` that is the daemon's child, which runs docker-proxy);
//! - it shares the daemon's mount, network and pid namespaces.
//!
//! The daemon's pid comes from the API socket itself (SO_PEERCRED of a connection to it):
//! whatever answers on the socket bindtrace reads is the daemon whose word counts.
use std::{fs, io, os::unix::fs::MetadataExt, path::Path};

use crate::diagnose::procfs::ProcDir;

/// Where Docker's packages put the proxy: Debian's in /usr/sbin, Docker's own in /usr/bin, some
/// distributions under libexec. Used when the daemon names no `--userland-proxy-path`.
const PROXY_PATHS: [&str; 4] = [
    "/usr/bin/docker-proxy",
    "/usr/sbin/docker-proxy",
    "/usr/libexec/docker/docker-proxy",
    "/usr/local/bin/docker-proxy",
];

/// Where RootlessKit's packages put `rootlesskit-docker-proxy`: what a rootless dockerd runs
/// as its userland proxy; it asks RootlessKit's port driver to listen on the host and runs
/// docker-proxy inside RootlessKit's namespace.
const ROOTLESSKIT_PROXY_PATHS: [&str; 2] =
    ["/usr/bin/rootlesskit-docker-proxy", "/usr/local/bin/rootlesskit-docker-proxy"];

/// What identifies the daemon's own processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Daemon {
    pub(crate) pid: u32,
    /// (device, inode) of each file the daemon may run as its proxy.
    proxies: Vec<(u64, u64)>,
    /// Mount, network and pid namespace inodes.
    namespaces: [u64; 3],
    /// (device, inode) of RootlessKit's proxy wrapper, which a rootless dockerd runs as its
    /// userland proxy and which runs docker-proxy in turn (rootless engines only).
    relays: Vec<(u64, u64)>,
    /// Its user namespace is not ours: a rootless engine (rootless Docker inside RootlessKit,
    /// a user's podman service), whose network namespace is its own too.
    in_userns: bool,
}

impl Daemon {
    /// The daemon behind `socket`, or None when it cannot be told (not reachable, or outside
    /// our pid namespace: SO_PEERCRED then reports pid 0).
    pub(crate) async fn behind(socket: &Path) -> Option<Daemon> {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let pid = stream.peer_cred().ok()?.pid().filter(|&p| p > 0)?;
        Daemon::of(pid as u32).ok()
    }

    pub(crate) fn of(pid: u32) -> io::Result<Daemon> {
        let proc = ProcDir::open(pid)?;
        let root = format!("/proc/{pid}/root");
        let (argv, _) = proc.argv();
        let proxies = proxy_path_flag(&argv)
            .map(|p| vec![p])
            .unwrap_or_else(|| PROXY_PATHS.iter().map(|p| p.to_string()).collect())
            .iter()
            .filter_map(|p| fs::metadata(format!("{root}{p}")).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let own_userns = fs::metadata("/proc/self/ns/user").map(|m| m.ino()).ok();
        let in_userns = proc.namespace_inode("user").is_some_and(|u| Some(u) != own_userns);
        let relays = if in_userns {
            ROOTLESSKIT_PROXY_PATHS
                .iter()
                .filter_map(|p| fs::metadata(format!("{root}{p}")).ok())
                .map(|m| (m.dev(), m.ino()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Daemon { pid, proxies, namespaces: namespaces_of(&proc)?, relays, in_userns })
    }

    /// Whether the engine runs rootless, in a user namespace of its own.
    pub(crate) fn rootless(&self) -> bool {
        self.in_userns
    }

    /// Whether `pid` is this daemon's userland proxy (see the module's rules).
    pub(crate) fn owns_proxy(&self, pid: u32) -> bool {
        let Ok(proc) = ProcDir::open(pid) else { return false };
        let exe = proc.exe_identity();
        exe.is_some_and(|id| self.proxies.contains(&id))
            && (proc.parent() == Some(self.pid) || proc.parent().is_some_and(|p| self.owns_relay(p)))
            && namespaces_of(&proc).is_ok_and(|ns| ns == self.namespaces)
            && proc.still_same()
    }

    /// Whether `pid` is a rootless daemon's `rootlesskit-docker-proxy`: RootlessKit's
    /// executable, the daemon's child, in the daemon's namespaces.
    fn owns_relay(&self, pid: u32) -> bool {
        if self.relays.is_empty() {
            return false;
        }
        let Ok(proc) = ProcDir::open(pid) else { return false };
        proc.exe_identity().is_some_and(|id| self.relays.contains(&id))
            && proc.parent() == Some(self.pid)
            && namespaces_of(&proc).is_ok_and(|ns| ns == self.namespaces)
            && proc.still_same()
    }
}

fn namespaces_of(proc: &ProcDir) -> io::Result<[u64; 3]> {
    let ns = |name: &str| proc.namespace_inode(name).ok_or_else(|| io::Error::other(format!("no ns/{name}")));
    Ok([ns("mnt")?, ns("net")?, ns("pid")?])
}

/// `--userland-proxy-path=P` or `--userland-proxy-path P` in the daemon's arguments.
pub(crate) fn proxy_path_flag(argv: &[String]) -> Option<String> {
    let mut args = argv.iter();
    while let Some(a) = args.next() {
        if let Some(v) = a.strip_prefix("--userland-proxy-path=") {
            return Some(v.to_owned());
        }
        if a == "--userland-proxy-path" {
            return args.next().cloned();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_path_flag_in_both_forms() {
        let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(proxy_path_flag(&argv("dockerd --userland-proxy-path=/opt/p")), Some("/opt/p".into()));
        assert_eq!(
            proxy_path_flag(&argv("dockerd --userland-proxy-path /opt/p -H fd://")),
            Some("/opt/p".into())
        );
        assert_eq!(proxy_path_flag(&argv("dockerd -H fd://")), None);
    }

    /// A process in our own user namespace is not a rootless engine, and has no RootlessKit
    /// relay to accept proxies through.
    #[test]
    fn our_own_user_namespace_is_not_rootless() {
        let d = Daemon::of(std::process::id()).unwrap();
        assert!(!d.rootless());
        assert!(d.relays.is_empty());
    }

    /// Our own process is not a proxy of a "daemon" that is our parent-less self: the parent
    /// rule alone refuses it, whatever the executable.
    #[test]
    fn a_process_is_not_its_own_proxy() {
        let me = std::process::id();
        let mut d = Daemon::of(me).unwrap();
        d.proxies.push(ProcDir::open(me).unwrap().exe_identity().unwrap());
        assert!(!d.owns_proxy(me), "its parent is not itself");
    }
}
