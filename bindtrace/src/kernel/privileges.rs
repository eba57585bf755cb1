//! bindtrace needs to load BPF programs, enter namespaces and read other processes' file
//! descriptors. Say exactly which capability is missing, before anything is loaded; once
//! everything is loaded, keep only what the running daemon still uses ([`restrict`]).
use std::{fs, io};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
#[error(
    "bindtrace needs the capabilities {}; this process lacks {}. Run it as root: `sudo bindtrace`",
    needed_list(),
    .missing.join(", ")
)]
pub(crate) struct MissingCapabilities {
    pub(crate) missing: Vec<&'static str>,
}

fn needed_list() -> String {
    NEEDED.iter().map(|(_, name, _)| *name).collect::<Vec<_>>().join(", ")
}

/// (bit, name, why). CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON on kernels before 5.8.
const NEEDED: &[(u32, &str, &str)] = &[
    (CAP_BPF, "CAP_BPF", "load the eBPF programs"),
    (CAP_PERFMON, "CAP_PERFMON", "read kernel memory from a tracing program"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN", "query network namespaces over rtnetlink"),
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", "enter container network namespaces (setns)"),
    (CAP_SYS_PTRACE, "CAP_SYS_PTRACE", "find which processes hold a listening socket"),
];

/// Effective capability set of this process, from /proc/self/status.
pub(crate) fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// One capability set-up needs, as `bindtrace doctor` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Needed {
    pub(crate) name: &'static str,
    pub(crate) why: &'static str,
    pub(crate) held: bool,
    /// Missing itself but stood in for by CAP_SYS_ADMIN (kernels before 5.8, Docker 20.10).
    pub(crate) covered_by_sys_admin: bool,
}

/// Each capability set-up needs and whether the effective set `eff` provides it; set-up
/// succeeds exactly when every one is `held` or `covered_by_sys_admin`.
pub(crate) fn each_needed(eff: u64) -> Vec<Needed> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    NEEDED
        .iter()
        .map(|&(bit, name, why)| Needed {
            name,
            why,
            held: has(bit),
            covered_by_sys_admin: !has(bit) && matches!(bit, CAP_BPF | CAP_PERFMON) && has(CAP_SYS_ADMIN),
        })
        .collect()
}

pub(crate) fn check() -> Result<(), MissingCapabilities> {
    missing_from(effective())
}

fn missing_from(eff: u64) -> Result<(), MissingCapabilities> {
    let missing: Vec<&'static str> =
        each_needed(eff).into_iter().filter(|n| !n.held && !n.covered_by_sys_admin).map(|n| n.name).collect();
    if missing.is_empty() { Ok(()) } else { Err(MissingCapabilities { missing }) }
}

/// What the running daemon keeps after set-up, and why:
/// - CAP_SYS_ADMIN: enter container network namespaces (setns), for every line and audit;
/// - CAP_NET_ADMIN: attach the tc hook to ports that appear later;
/// - CAP_SYS_PTRACE: read other processes' /proc (who holds a socket, the daemon's root);
/// - CAP_BPF: read the maps (before about 6.5 every bpf() command needs it when unprivileged
///   BPF is disabled, Debian's default; CAP_SYS_ADMIN stands in before 5.8);
/// - CAP_DAC_OVERRIDE: connect to a rootless runtime's API socket (rootless podman's
///   /run/user/UID/podman/podman.sock is its user's, mode 0600; rootless Docker's
///   /run/user/UID/docker.sock 0660 in a directory of mode 0700), also when it comes back later.
///   Where bindtrace runs without it (`--cap-drop ALL`), only those sockets are out of reach.
///
/// Everything else goes, CAP_PERFMON and CAP_SYS_RESOURCE included (loading is done).
pub(crate) const KEPT: &[(u32, &str)] = &[
    (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
    (CAP_BPF, "CAP_BPF"),
    (CAP_DAC_OVERRIDE, "CAP_DAC_OVERRIDE"),
];

/// The kernel's capability header and data (linux/capability.h, version 3: two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops every capability but [`KEPT`] from the calling thread's effective, permitted and
/// inheritable sets, and sets no_new_privs, so nothing exec'd later can gain any back. Both are
/// per thread and inherited by threads created afterwards: call it on the main thread after
/// loading and before any long-lived thread starts.
pub(crate) fn restrict() -> io::Result<()> {
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let keep: u64 = KEPT.iter().fold(0, |m, (bit, _)| m | (1u64 << bit));
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as version 3 wants.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for (i, d) in data.iter_mut().enumerate() {
        let word = (keep >> (32 * i)) as u32;
        // Only ever clear bits: a bit kept that the thread lacks stays absent.
        d.effective &= word;
        d.permitted &= word;
        d.inheritable = 0;
    }
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    log::debug!(
        "set-up done: kept {} (and no_new_privs)",
        KEPT.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless elsewhere).
pub(crate) fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

/// Raises the soft limit on open files to the hard limit (never the hard limit itself): a
/// host with thousands of containers needs a descriptor per watched namespace, and the
/// default soft limit of 1024 is a relic of select(2), which bindtrace does not use.
pub(crate) fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        log::debug!("could not raise RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
    } else {
        log::debug!("open-file limit raised from {} to {}", lim.rlim_cur, lim.rlim_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_capability() {
        let err = missing_from(0).unwrap_err();
        assert_eq!(
            err.missing,
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]
        );
        assert!(err.to_string().contains("sudo bindtrace"));
    }

    #[test]
    fn full_set_and_sys_admin_fallback() {
        assert!(missing_from(u64::MAX).is_ok());
        let old_kernel_root = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE);
        assert!(missing_from(old_kernel_root).is_ok());
        let err = missing_from(1 << CAP_SYS_ADMIN).unwrap_err();
        assert_eq!(err.missing, vec!["CAP_NET_ADMIN", "CAP_SYS_PTRACE"]);
        let each = each_needed(old_kernel_root);
        assert!(each.iter().all(|n| n.held || n.covered_by_sys_admin));
        assert!(each.iter().find(|n| n.name == "CAP_BPF").unwrap().covered_by_sys_admin);
    }
}
