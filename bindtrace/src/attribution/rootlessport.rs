//! Rootless podman's port forwarder, told apart from whatever else runs in the container.
//!
//! `rootlessport` listens on the host ports of a rootless container and re-executes itself
//! (through `/proc/self/exe`, so the kernel's `comm` of the child says `exe`) as
//! rootlessport-child inside the container's network namespace, which dials the container's own
//! address. A process in the container could call itself anything and dial the same address, so
//! neither its name nor its namespace is proof. It is the forwarder when:
//! - its executable is podman's `rootlessport`, compared by (device, inode) with the file where
//!   podman's packages install it, as bindtrace's own mount namespace sees it (rootless podman
//!   runs it from the host's /usr: a container's own file of that name is another inode);
//! - it runs in the network namespace the refusal was seen in.
use std::{fs, os::unix::fs::MetadataExt};

use crate::diagnose::procfs::ProcDir;

/// Where podman's packages put it (`helper_binaries_dir`): Debian's /usr/lib/podman, Fedora's
/// /usr/libexec/podman, and the same under /usr/local for builds from source.
const PATHS: [&str; 4] = [
    "/usr/lib/podman/rootlessport",
    "/usr/libexec/podman/rootlessport",
    "/usr/local/lib/podman/rootlessport",
    "/usr/local/libexec/podman/rootlessport",
];

/// How reports name it (`client_process.comm`): the executable's name, as the kernel's comm
/// of the child is `exe`.
pub(crate) const NAME: &str = "rootlessport";

/// Whether `pid` is podman's rootlessport running in the network namespace `netns`.
pub(crate) fn is_forwarder(pid: u32, netns: u64) -> bool {
    let identities: Vec<(u64, u64)> =
        PATHS.iter().filter_map(|p| fs::metadata(p).ok()).map(|m| (m.dev(), m.ino())).collect();
    is_forwarder_among(pid, netns, &identities)
}

fn is_forwarder_among(pid: u32, netns: u64, identities: &[(u64, u64)]) -> bool {
    let Ok(proc) = ProcDir::open(pid) else { return false };
    proc.exe_identity().is_some_and(|id| identities.contains(&id))
        && proc.netns_inode() == Some(netns)
        && proc.still_same()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_netns() -> u64 {
        fs::metadata("/proc/self/ns/net").unwrap().ino()
    }

    /// Our own process stands in: with its executable's identity it passes, in its own
    /// namespace only; without it, it is not the forwarder whatever else holds.
    #[test]
    fn the_executable_and_the_namespace_decide() {
        let me = std::process::id();
        let exe = fs::metadata("/proc/self/exe").unwrap();
        let ours = [(exe.dev(), exe.ino())];
        assert!(is_forwarder_among(me, own_netns(), &ours));
        assert!(!is_forwarder_among(me, own_netns() + 1, &ours), "another namespace");
        assert!(!is_forwarder_among(me, own_netns(), &[]), "another executable");
        assert!(!is_forwarder_among(u32::MAX - 1, own_netns(), &ours), "no such process");
        // The test binary is no rootlessport, wherever podman's is installed.
        assert!(!is_forwarder(me, own_netns()));
    }
}
