//! bindtrace needs to load BPF programs, enter namespaces and read other processes' file
//! descriptors. Say exactly which capability is missing, before anything is loaded.
use std::fs;

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
fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub(crate) fn check() -> Result<(), MissingCapabilities> {
    missing_from(effective())
}

fn missing_from(eff: u64) -> Result<(), MissingCapabilities> {
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    let missing: Vec<&'static str> = NEEDED
        .iter()
        .filter(|(bit, _, _)| {
            let covered_by_sys_admin = matches!(*bit, CAP_BPF | CAP_PERFMON) && has(CAP_SYS_ADMIN);
            !has(*bit) && !covered_by_sys_admin
        })
        .map(|(_, name, _)| *name)
        .collect();
    if missing.is_empty() { Ok(()) } else { Err(MissingCapabilities { missing }) }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless elsewhere).
pub(crate) fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
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
    }
}
