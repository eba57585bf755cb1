//! The kernel's checks: release, BTF, the eBPF object, which hooks exist, lockdown, and the
//! platform the kernel gives away (WSL2, Docker Desktop's LinuxKit VM).
use crate::{
    doctor::report::Check,
    kernel::{btf::Btf, hook, layout::KernelLayout, loader, tc},
};

pub(crate) const LOCKDOWN_FILE: &str = "/sys/kernel/security/lockdown";

/// The running kernel's release (`uname -r`).
pub(crate) fn release() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates every field.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// (major, minor) from a release such as `6.18.44-fc` or `5.15.153.1-microsoft-standard-WSL2`.
fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The BPF ring buffer bindtrace's events go through appeared in 5.8; the oldest kernel the
/// matrix boots is 5.10.
pub(crate) fn kernel_check(release: &str) -> Check {
    const NAME: &str = "kernel";
    match major_minor(release) {
        None => Check::warn(
            NAME,
            format!("cannot read the release {release:?}"),
            "bindtrace needs Linux 5.8 or later",
        ),
        Some(v) if v < (5, 8) => Check::fail(
            NAME,
            format!("Linux {release}: older than 5.8, which brought the BPF ring buffer"),
            "a kernel of 5.10 or later (see docs/kernels.md)",
        ),
        Some(v) if v < (5, 10) => Check::warn(
            NAME,
            format!("Linux {release}: untested (the kernel matrix starts at 5.10)"),
            "a kernel of 5.10 or later is tested",
        ),
        Some(_) => Check::ok(NAME, format!("Linux {release}")),
    }
}

pub(crate) fn btf_check(btf: Result<&Btf, &str>) -> Check {
    match btf {
        Ok(b) => Check::ok("btf", format!("/sys/kernel/btf/vmlinux: {} types", b.type_count())),
        Err(e) => {
            Check::fail("btf", e, "a kernel built with CONFIG_DEBUG_INFO_BTF=y (see README.md, Requirements)")
        }
    }
}

pub(crate) fn object_check() -> Check {
    match loader::check_object() {
        Ok(()) => Check::ok("ebpf_object", "the eBPF programs are built into this binary"),
        Err(e) => Check::fail("ebpf_object", e.to_string(), "rebuild without BINDTRACE_SKIP_EBPF=1"),
    }
}

/// Which hooks this kernel's BTF offers, by the code that picks one at start-up.
pub(crate) fn hooks_check(btf: Result<&Btf, &str>) -> Check {
    const NAME: &str = "hooks";
    let Ok(btf) = btf else {
        return Check::fail(NAME, "no BTF, so no hook can be chosen", "see the btf line");
    };
    let layout = match KernelLayout::resolve(btf) {
        Ok(l) => l,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("reading this kernel's layout from BTF: {e}"),
                "report this kernel at https://github.com/bindtrace/bindtrace/issues",
            );
        }
    };
    let tc = tc::AttachMode::detect(btf);
    hooks_line(&layout, tc)
}

fn hooks_line(layout: &KernelLayout, tc: tc::AttachMode) -> Check {
    let mut found = Vec::new();
    if layout.rst_reason_no_socket.is_some() {
        found.push("tcp-send-reset".to_owned());
    }
    if layout.drop_reason_no_socket.is_some() {
        found.push("kfree-skb".to_owned());
    }
    found.push(format!("tc ({})", tc.name()));
    match hook::choose(hook::HookChoice::Auto, layout) {
        Ok((chosen, why)) => {
            Check::ok("hooks", format!("{}; --hook auto takes {chosen} ({why})", found.join(", ")))
        }
        Err(e) => Check::fail("hooks", e.to_string(), "--hook tc"),
    }
}

/// `none [integrity] confidentiality` -> `integrity`.
fn lockdown_mode(content: &str) -> Option<&str> {
    let start = content.find('[')? + 1;
    let end = start + content[start..].find(']')?;
    Some(&content[start..end])
}

/// Lockdown's `confidentiality` mode refuses tracing programs' reads of kernel memory
/// (LOCKDOWN_BPF_READ_KERNEL), which every hook does; `integrity` only refuses writes.
/// `read` is the lockdown file's content, or why it could not be read.
pub(crate) fn lockdown_check(read: Result<String, String>) -> Check {
    const NAME: &str = "lockdown";
    match read {
        Err(why) => Check::warn(
            NAME,
            format!("unknown ({why}; inside a container securityfs is usually not mounted)"),
            format!("on the host, `cat {LOCKDOWN_FILE}` must not select [confidentiality]"),
        ),
        Ok(content) => match lockdown_mode(&content) {
            Some("confidentiality") => Check::fail(
                NAME,
                "confidentiality: the kernel refuses eBPF reads of kernel memory",
                "boot with lockdown=integrity (or none), e.g. Secure Boot's lockdown turned off",
            ),
            Some(mode) => Check::ok(NAME, mode.to_owned()),
            None => Check::warn(NAME, format!("cannot parse {:?}", content.trim()), "read it on the host"),
        },
    }
}

pub(crate) fn read_lockdown() -> Result<String, String> {
    std::fs::read_to_string(LOCKDOWN_FILE).map_err(|e| format!("{LOCKDOWN_FILE}: {e}"))
}

/// What the kernel release and the Docker daemon say about where this runs.
pub(crate) struct PlatformFacts<'a> {
    pub(crate) release: &'a str,
    /// The Docker daemon's `/version`: `Platform.Name` and `KernelVersion`.
    pub(crate) docker_platform: Option<&'a str>,
    pub(crate) docker_kernel: Option<&'a str>,
}

const IMAGE_LINE: &str = "docker run --privileged --pid host --network host \
                          -v /var/run/docker.sock:/var/run/docker.sock:ro bindtrace";

/// WSL2 kernels say `microsoft` in their release, Docker Desktop's VM `linuxkit`; a daemon on
/// another kernel than ours (Docker Desktop, a VM, a remote host) runs containers bindtrace
/// here cannot see.
pub(crate) fn platform_check(f: &PlatformFacts) -> Check {
    const NAME: &str = "platform";
    let release = f.release.to_ascii_lowercase();
    if release.contains("microsoft") {
        return Check::warn(
            NAME,
            format!("WSL2 ({}) (documented, not tested)", f.release),
            "run bindtrace inside the WSL2 distribution as root, on a WSL2 kernel of 5.15.74.2 or later (the first with BTF); \
             6.6.87 can refuse eBPF loads with permission denied (microsoft/WSL#13047)",
        );
    }
    if release.contains("linuxkit") {
        return Check::warn(
            NAME,
            format!("Docker Desktop's VM (LinuxKit {}) (documented, not tested)", f.release),
            format!(
                "run the image inside Docker Desktop with --pid host (required) and --network host: {IMAGE_LINE}"
            ),
        );
    }
    if let Some(name) = f.docker_platform.filter(|n| n.contains("Docker Desktop")) {
        return Check::fail(
            NAME,
            format!("the Docker Engine is {name}: its containers run in Desktop's VM, not on this kernel"),
            format!("run bindtrace's image in that VM: {IMAGE_LINE}"),
        );
    }
    if let Some(theirs) = f.docker_kernel.filter(|k| !k.is_empty() && *k != f.release) {
        return Check::fail(
            NAME,
            format!(
                "the Docker daemon runs on kernel {theirs}, this is {}: its containers are on another machine or VM",
                f.release
            ),
            format!("run bindtrace on the daemon's machine, e.g. its image: {IMAGE_LINE}"),
        );
    }
    match f.docker_kernel {
        Some(_) => Check::ok(NAME, "Linux, the Docker daemon's own kernel (not WSL2, not Docker Desktop)"),
        None => Check::ok(NAME, "Linux (not WSL2, not Docker Desktop's VM)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        doctor::report::Status,
        kernel::btf::tests::{V5_10, V6_1, V6_18, fixture},
    };

    #[test]
    fn old_kernels_fail_and_untested_ones_warn() {
        assert_eq!(kernel_check("6.18.44-fc-v1147").status, Status::Ok);
        assert_eq!(kernel_check("5.10.0-46-amd64").status, Status::Ok);
        assert_eq!(kernel_check("5.9.1").status, Status::Warn);
        assert_eq!(kernel_check("4.19.0-27-amd64").status, Status::Fail);
        assert_eq!(kernel_check("5.15.153.1-microsoft-standard-WSL2").status, Status::Ok);
    }

    #[test]
    fn hooks_follow_the_kernels_btf() {
        let c = hooks_check(Ok(fixture(V6_18)));
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.detail.starts_with("tcp-send-reset, kfree-skb, tc (tcx); --hook auto takes tcp-send-reset"),
            "{}",
            c.detail
        );
        let c = hooks_check(Ok(fixture(V6_1)));
        assert!(c.detail.starts_with("kfree-skb, tc (clsact); --hook auto takes kfree-skb"), "{}", c.detail);
        let c = hooks_check(Ok(fixture(V5_10)));
        assert!(c.detail.starts_with("tc (clsact); --hook auto takes tc"), "{}", c.detail);
        assert_eq!(hooks_check(Err("no BTF")).status, Status::Fail);
    }

    #[test]
    fn lockdown_modes() {
        assert_eq!(lockdown_check(Ok("[none] integrity confidentiality\n".into())).status, Status::Ok);
        assert_eq!(lockdown_check(Ok("none [integrity] confidentiality\n".into())).detail, "integrity");
        assert_eq!(lockdown_check(Ok("none integrity [confidentiality]\n".into())).status, Status::Fail);
        let unknown = lockdown_check(Err("no such file".into()));
        assert_eq!(unknown.status, Status::Warn);
        assert!(unknown.detail.starts_with("unknown"));
    }

    #[test]
    fn platforms_are_recognised() {
        let p = |release, platform, kernel| {
            platform_check(&PlatformFacts { release, docker_platform: platform, docker_kernel: kernel })
        };
        let wsl = p("5.15.153.1-microsoft-standard-WSL2", None, None);
        assert!(wsl.detail.starts_with("WSL2") && wsl.remedy.unwrap().contains("5.15.74.2"));
        let desktop_vm =
            p("6.10.14-linuxkit", Some("Docker Desktop 4.36.0 (175267)"), Some("6.10.14-linuxkit"));
        assert!(desktop_vm.remedy.unwrap().contains("--pid host"));
        let outside = p("6.8.0-45-generic", Some("Docker Desktop 4.36.0 (175267)"), Some("6.10.14-linuxkit"));
        assert_eq!(outside.status, Status::Fail);
        assert_eq!(p("6.8.0-45-generic", Some(""), Some("6.1.0-9-amd64")).status, Status::Fail);
        assert_eq!(p("6.8.0-45-generic", Some(""), Some("6.8.0-45-generic")).status, Status::Ok);
        assert_eq!(p("6.8.0-45-generic", None, None).status, Status::Ok);
    }
}
