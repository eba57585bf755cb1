//! The .deb (`cargo xtask deb`, path in BINDTRACE_DEB, set by `sudo ./x test`): `dpkg -i`, the
//! binary, the man page and the completions work, the installed unit passes `systemd-analyze
//! verify`, the installed binary runs the way the unit starts it and reports a refusal, and
//! `dpkg --purge` leaves none of the package's files behind.
//!
//! PID 1 here is not systemd, so "the way the unit starts it" is its ExecStart= command with the
//! unit's CapabilityBoundingSet= and NoNewPrivileges= applied by setpriv(1), in a topology's host
//! namespace (its own docker0 and its own loopback for the metrics port).
//!
//! Without root or the .deb this skips, except under CI (the variable `CI` set), where it fails.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use bindtrace_tests::{Listener, Topology, connect, is_root, skip};

const UNIT: &str = "/lib/systemd/system/bindtrace.service";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", "bindtrace"]);
    String::from_utf8_lossy(&out.stdout).contains("ok installed")
}

/// Purges the package on drop, so a failing test leaves the machine as it found it.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "bindtrace"]).stdout(Stdio::null()).status();
    }
}

/// The value of `Key=` in the installed unit's [Service] section (last one wins, as systemd).
fn unit_value(unit: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .next_back()
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_owned()
}

#[test]
fn deb_installs_runs_and_purges() {
    if !is_root() {
        return skip("needs root (dpkg -i)");
    }
    let Some(deb) = std::env::var_os("BINDTRACE_DEB") else {
        return skip("BINDTRACE_DEB is not set: `sudo ./x test` builds the .deb and sets it");
    };
    let deb = deb.to_string_lossy().into_owned();
    assert!(Path::new(&deb).is_file(), "BINDTRACE_DEB={deb} is not a file");
    assert!(
        !installed(),
        "bindtrace is already installed as a package here; this test installs and purges its own"
    );

    run_ok("dpkg", &["-i", &deb]);
    let guard = Installed;
    let files: Vec<String> = run_ok("dpkg", &["-L", "bindtrace"])
        .lines()
        // Files (and links to files); not directories, nor /lib where it links to usr/lib.
        .filter(|p| !Path::new(p).is_dir())
        .map(str::to_owned)
        .collect();
    for expected in [
        "/usr/bin/bindtrace",
        UNIT,
        "/usr/share/man/man1/bindtrace.1.gz",
        "/usr/share/bash-completion/completions/bindtrace",
        "/usr/share/zsh/vendor-completions/_bindtrace",
        "/usr/share/fish/vendor_completions.d/bindtrace.fish",
        "/usr/share/doc/bindtrace/copyright",
    ] {
        assert!(files.iter().any(|f| f == expected), "{expected} is not in the package: {files:?}");
    }

    let version = run_ok("/usr/bin/bindtrace", &["--version"]);
    assert_eq!(version.trim(), format!("bindtrace {}", env!("CARGO_PKG_VERSION")));

    assert_eq!(run_ok("man", &["-w", "bindtrace"]).trim(), "/usr/share/man/man1/bindtrace.1.gz");
    let page = Command::new("man")
        .args(["-P", "cat", "bindtrace"])
        .env("MANWIDTH", "80")
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    let head: Vec<&str> = page.lines().take(12).collect();
    // NAME, then "bindtrace - what it does" (groff may pad the dash with two spaces).
    let named = head.iter().skip_while(|l| l.trim() != "NAME").nth(1).is_some_and(|l| {
        l.trim_start().strip_prefix("bindtrace").is_some_and(|rest| rest.trim_start().starts_with("- "))
    });
    assert!(named, "man bindtrace | head:\n{}", head.join("\n"));
    assert!(page.contains("--metrics-addr"), "the man page lacks --metrics-addr:\n{page}");

    // bash loads the completion and registers it for the command.
    let registered = run_ok(
        "bash",
        &["-c", "source /usr/share/bash-completion/completions/bindtrace && complete -p bindtrace"],
    );
    assert!(registered.contains("bindtrace"), "{registered}");

    let verify = run("systemd-analyze", &["verify", UNIT]);
    let said = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(verify.status.success(), "systemd-analyze verify {UNIT}: {said}");
    assert!(!said.contains("bindtrace.service"), "systemd-analyze verify complains about the unit: {said}");

    run_as_the_unit(&std::fs::read_to_string(UNIT).unwrap());

    // `systemctl enable` works on the file system without systemd running; purge undoes it.
    run_ok("systemctl", &["enable", "bindtrace.service"]);
    let wants = "/etc/systemd/system/multi-user.target.wants/bindtrace.service";
    assert!(Path::new(wants).is_symlink(), "systemctl enable made no {wants}");

    std::mem::forget(guard);
    run_ok("dpkg", &["--purge", "bindtrace"]);
    assert!(!installed(), "still installed after dpkg --purge");
    let left: Vec<&String> =
        files.iter().filter(|f| Path::new(f).exists() || Path::new(f).is_symlink()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new(wants).is_symlink(), "{wants} left after purge");
}

/// ExecStart= under the unit's capability bounding set and no_new_privs, in a topology's host
/// namespace: it must attach, report a refusal to a loopback-only listener, and exit 0 on SIGTERM.
fn run_as_the_unit(unit: &str) {
    let exec: Vec<String> = unit_value(unit, "ExecStart").split_whitespace().map(str::to_owned).collect();
    assert_eq!(exec[0], "/usr/bin/bindtrace", "ExecStart runs the packaged binary");
    assert_eq!(unit_value(unit, "NoNewPrivileges"), "yes");
    // CAP_SYS_ADMIN -> +sys_admin, as setpriv names them.
    let bounding: Vec<String> = unit_value(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let caps = format!("-all,{}", bounding.join(","));

    let mut topo = Topology::new();
    let container = topo.container();
    let port = 18080;
    let _listener = Listener::start(&container.ns.name, "127.0.0.1", port, &[]);

    // Under strace, for the system calls it makes (checked against the unit's filter below).
    let trace = std::env::temp_dir().join(format!("bindtrace-deb-strace-{}", std::process::id()));
    let mut child = Command::new("ip")
        .args(["netns", "exec", &topo.host.name, "strace", "-f", "-qq", "-o"])
        .arg(&trace)
        .args(["setpriv", "--bounding-set", &caps, "--inh-caps", "-all", "--no-new-privs", "--"])
        .args(&exec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the installed bindtrace");
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let tx_out = tx.clone();
    let readers = [
        std::thread::spawn(move || {
            BufReader::new(out).lines().map_while(Result::ok).for_each(|l| drop(tx_out.send((true, l))))
        }),
        std::thread::spawn(move || {
            BufReader::new(err).lines().map_while(Result::ok).for_each(|l| drop(tx.send((false, l))))
        }),
    ];
    let mut lines = Lines { rx, seen: Vec::new() };
    let give_up = |lines: &Lines, what: &str| -> ! {
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        panic!("the installed bindtrace, run as its unit, never said {what}:\n{}", lines.seen.join("\n"));
    };
    if !lines.wait_for(|stdout, l| !stdout && l.contains("bindtrace: ready")) {
        give_up(&lines, "bindtrace: ready");
    }
    if !lines.seen.iter().any(|l| l.contains("attached")) {
        give_up(&lines, "attached");
    }

    let refused = connect(&topo.host, container.ipv4, port);
    assert!(refused.is_err(), "a loopback-only listener accepted a forwarded connection");
    let target = format!("{}:{port}", container.ipv4);
    if !lines.wait_for(|stdout, l| {
        stdout && l.contains("refused") && l.contains(&target) && l.contains("loopback_only")
    }) {
        give_up(&lines, "the refusal");
    }
    let seen = lines.seen;

    // strace's only child is bindtrace (setpriv execs it); strace exits with its status.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).unwrap();
    let bindtrace: i32 = children.split_whitespace().next().expect("strace has a child").parse().unwrap();
    // SAFETY: a signal to the process this test started.
    unsafe { libc::kill(bindtrace, libc::SIGTERM) };
    let status = child.wait().unwrap();
    for r in readers {
        let _ = r.join();
    }
    assert_eq!(
        status.code(),
        Some(0),
        "bindtrace run as its unit did not exit 0 on SIGTERM:\n{}",
        seen.join("\n")
    );

    let traced = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_file(&trace);
    let used = syscalls_after_exec(&traced, &exec[0]);
    assert!(used.contains("bpf") && used.contains("setns"), "the trace lacks bpf and setns: {used:?}");
    let allowed = unit_syscall_filter(unit);
    // The expansion takes the denied groups away (so this check can fail): mounting, modules,
    // rebooting and ptrace() stay refused.
    for refused in ["mount", "init_module", "reboot", "ptrace"] {
        assert!(!allowed.contains(refused), "the unit's filter allows {refused}");
    }
    // mount() comes only after unshare(CLONE_NEWNS) succeeded, on the thread that hides
    // /sys/kernel/btf from aya's loader; the unit's RestrictNamespaces= refuses that unshare,
    // and bindtrace then loads as before without mounting. strace runs it without the unit's
    // seccomp filter, so the call shows here: it is unreachable under the unit only while the
    // unit does not allow mount namespaces.
    let mut used = used;
    if !unit_value(unit, "RestrictNamespaces").split_whitespace().any(|n| n == "mnt") {
        used.remove("mount");
    }
    eprintln!("bindtrace, run as its unit, made {} distinct system calls: {used:?}", used.len());
    let denied: Vec<&String> = used.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(
        denied.is_empty(),
        "the unit's SystemCallFilter= would refuse system calls bindtrace makes: {denied:?}"
    );
}

/// Lines from the process's stdout (true) and stderr (false), and every line seen so far.
struct Lines {
    rx: mpsc::Receiver<(bool, String)>,
    seen: Vec<String>,
}

impl Lines {
    /// Waits up to 30 s for a line matching `pred`; false if none came (or the process ended).
    fn wait_for(&mut self, pred: impl Fn(bool, &str) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok((stdout, line)) = self.rx.recv_timeout(left) else { return false };
            let hit = pred(stdout, &line);
            self.seen.push(line);
            if hit {
                return true;
            }
        }
        false
    }
}

/// The system calls of strace -f lines (`PID name(args) = ret`) after `binary` was exec'd.
fn syscalls_after_exec(trace: &str, binary: &str) -> std::collections::BTreeSet<String> {
    let exec = format!("execve(\"{binary}\"");
    let mut after_exec = false;
    let mut used = std::collections::BTreeSet::new();
    for line in trace.lines() {
        let Some((_pid, call)) = line.split_once(' ') else { continue };
        let call = call.trim_start();
        if call.starts_with(&exec) {
            after_exec = true;
            continue;
        }
        let name: String = call.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if after_exec && !name.is_empty() && call[name.len()..].starts_with('(') {
            used.insert(name);
        }
    }
    assert!(after_exec, "strace never saw {exec}");
    used
}

/// What the unit's SystemCallFilter= lines allow, as systemd reads them: the first line (not
/// negated) is the allow list, later lines add to it, `~` lines take away; groups (`@name`) are
/// expanded by `systemd-analyze syscall-filter`.
fn unit_syscall_filter(unit: &str) -> std::collections::BTreeSet<String> {
    let expand = |items: &[&str]| -> Vec<String> {
        items
            .iter()
            .flat_map(|i| if i.starts_with('@') { expand_group(i) } else { vec![(*i).to_owned()] })
            .collect()
    };
    let mut allowed = std::collections::BTreeSet::new();
    for (i, line) in unit.lines().filter_map(|l| l.trim().strip_prefix("SystemCallFilter=")).enumerate() {
        let (deny, items) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        assert!(i > 0 || !deny, "the unit's first SystemCallFilter= must be an allow list");
        let items: Vec<&str> = items.split_whitespace().collect();
        for call in expand(&items) {
            if deny {
                allowed.remove(&call);
            } else {
                allowed.insert(call);
            }
        }
    }
    assert!(!allowed.is_empty(), "the unit has no SystemCallFilter=");
    allowed
}

/// The system calls of `@group`, nested groups expanded (`systemd-analyze syscall-filter
/// @group` lists the group's name, then its members, some of them groups).
fn expand_group(group: &str) -> Vec<String> {
    let text = run_ok("systemd-analyze", &["syscall-filter", "--no-pager", group]);
    let mut out = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#') && *l != group) {
        if l.starts_with('@') {
            out.extend(expand_group(l));
        } else {
            out.push(l.to_owned());
        }
    }
    out
}
