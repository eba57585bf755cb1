//! What a person sees: the terminal form under a real terminal (tmux), the piped form, and a
//! port scan collapsed on the terminal while JSON keeps one object per port. Real kernel, real
//! Docker for the first two, namespaces of our own for the scan. Run as root through
//! `sudo ./x test`.
//!
//! Every tmux server, container, namespace and file made here is removed by a guard, also on
//! panic; names are unique (prefixed `render`), and traffic goes only to the container and the
//! namespace these tests make.
use std::{
    collections::BTreeSet,
    io::Read,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Hook, Topology,
    bindtrace::binary,
    docker::{self, Container, Image, curl, free_port},
    metrics::syn_flood,
    net::unique,
    root_or_skip,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const HEADLINE_COLUMNS: usize = 100;
const SCANNED_PORTS: u16 = 1000;

/// True when this test cannot run here (under `CI` that is a failure instead).
fn skip_without_docker() -> bool {
    if !root_or_skip() {
        return true;
    }
    if !docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return true;
    }
    false
}

/// `2026-12-03T10:51:51Z` or `2026-12-03T10:51:51.123Z` at the start of `line`: RFC 3339 with
/// an offset.
fn starts_with_rfc3339(line: &str) -> bool {
    let Some(stamp) = line.split(' ').next() else { return false };
    let b = stamp.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && (stamp.ends_with('Z') || stamp[19..].contains(['+', '-']))
}

/// Escape sequences and other controls (a newline ends a line and is not one).
fn has_escape(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\n')
}

/// A loopback-bound busybox httpd published on a free host port.
fn loopback_container(img: &Image) -> (Container, u16) {
    let port = free_port();
    let c = Container::run(
        img,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    c.wait_listening(8000);
    (c, port)
}

/// Polls `what` until it returns Some, awaiting an event bindtrace causes (a line appearing).
fn await_some<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tmux server of our own (its own socket, so no other session's environment leaks in),
/// running one command in a 160-column pane; killed with everything in it on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let socket = unique("render-tmux");
        let status = Command::new("tmux")
            .args([
                "-L",
                &socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "render",
                "-x",
                "160",
                "-y",
                "200",
            ])
            .arg(command)
            .status()
            .expect("run tmux (Debian package tmux)");
        assert!(status.success(), "tmux new-session failed");
        Tmux { socket }
    }

    /// The pane's text, wrapped rows joined (`-J`) so a line is measured whole; `escapes`
    /// keeps the colour sequences (`-e`).
    fn capture(&self, escapes: bool) -> String {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket, "capture-pane", "-p", "-J", "-S", "-", "-t", "render"]);
        if escapes {
            cmd.arg("-e");
        }
        let out = cmd.output().expect("tmux capture-pane");
        assert!(out.status.success(), "capture-pane: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

/// A temporary directory for bindtrace's stderr and pid, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique("render-out"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join(name)).unwrap_or_default()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs bindtrace on a terminal (a tmux pane) with `env` (`env(1)` arguments), refuses the
/// container three times, stops bindtrace and returns the pane (plain, and with escapes).
fn refused_three_times_on_a_terminal(name: &str, port: u16, env: &[&str]) -> (String, String) {
    let dir = TempDir::new();
    let (err, pid) = (dir.0.join("stderr"), dir.0.join("pid"));
    // A fold window longer than the test: the second and third refusals are one folded line,
    // written by the exit flush. The pane stays open after bindtrace exits, for the capture.
    let command = format!(
        "env {} {} --no-metrics --fold-window 10m 2>{} & echo $! >{}; wait $!; echo \"bindtrace exited $?\"; \
         exec sleep 3600",
        env.join(" "),
        binary(),
        err.display(),
        pid.display()
    );
    let tmux = Tmux::start(&command);
    await_some("bindtrace: ready", || dir.read("stderr").contains("bindtrace: ready").then_some(()));
    let pid: i32 = await_some("the pid", || dir.read("pid").trim().parse().ok());

    let (code, _) = curl(&format!("http://localhost:{port}/"));
    assert!(code == 52 || code == 56, "curl should get an empty reply (52) or a reset (56), got {code}");
    // The first line written (its count read) before the next two refusals.
    let headline = |pane: String| pane.lines().any(|l| l.contains(" REFUSED ") && l.contains(name));
    await_some("the REFUSED headline", || headline(tmux.capture(false)).then_some(()));
    for _ in 0..2 {
        let (code, _) = curl(&format!("http://localhost:{port}/"));
        assert!(code == 52 || code == 56, "curl: {code}");
    }
    // SAFETY: a signal to the bindtrace this test started (its pid, from its own shell).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let pane = await_some("bindtrace's exit", || {
        let pane = tmux.capture(false);
        pane.contains("bindtrace exited").then_some(pane)
    });
    assert!(pane.contains("bindtrace exited 0"), "{pane}\nstderr:\n{}", dir.read("stderr"));
    (pane, tmux.capture(true))
}

/// 1. On a terminal: a headline within 100 columns, the detail lines, one short repeat line;
///    coloured by default, and with NO_COLOR no escape sequence at all.
#[test]
fn a_terminal_shows_a_headline_details_and_one_repeat_line() {
    if skip_without_docker() {
        return;
    }
    let img = Image::busybox();
    let (c, port) = loopback_container(&img);
    for no_color in [false, true] {
        let env: &[&str] = if no_color {
            &["NO_COLOR=1"]
        } else {
            &["-u", "NO_COLOR", "-u", "CLICOLOR", "-u", "CLICOLOR_FORCE"]
        };
        let (pane, with_escapes) = refused_three_times_on_a_terminal(&c.name, port, env);
        let lines: Vec<&str> = pane.lines().collect();
        let head = lines
            .iter()
            .position(|l| l.contains(" REFUSED ") && l.contains(&c.name))
            .unwrap_or_else(|| panic!("no REFUSED headline for {}:\n{pane}", c.name));
        let headline = lines[head];
        assert!(starts_with_rfc3339(headline), "{headline}");
        assert!(
            headline.chars().count() <= HEADLINE_COLUMNS,
            "{} columns: {headline}",
            headline.chars().count()
        );
        for part in ["8000/tcp on ", "via docker-proxy"] {
            assert!(headline.contains(part), "{part:?} in {headline}");
        }
        assert!(
            headline.contains(&format!("on 0.0.0.0:{port} "))
                || headline.contains(&format!("on [::]:{port} ")),
            "the published address in {headline}"
        );
        assert!(headline.contains("loopback_only"), "{headline}");
        let details: Vec<&str> =
            lines[head + 1..].iter().take_while(|l| l.starts_with("  ")).copied().collect();
        let details = details.join("\n");
        for part in [
            format!("  container {} ({}", c.name, c.short_id()),
            "  listens   127.0.0.1:8000 httpd (pid".into(),
            "  fix       ".into(),
            format!("  private   -p 127.0.0.1:{port}:8000"),
        ] {
            assert!(details.contains(&part), "{part:?} in the details:\n{details}\npane:\n{pane}");
        }
        let repeats: Vec<&&str> =
            lines.iter().filter(|l| l.contains(" again ") && l.contains(&c.name)).collect();
        assert_eq!(repeats.len(), 1, "one short repeat line:\n{pane}");
        assert!(repeats[0].contains("again x2") && repeats[0].contains(", as at 20"), "{}", repeats[0]);
        assert!(repeats[0].chars().count() <= HEADLINE_COLUMNS, "{}", repeats[0]);
        let refused_blocks = lines.iter().filter(|l| l.contains(" REFUSED ") && l.contains(&c.name)).count();
        assert_eq!(refused_blocks, 1, "the repeat is not a second block:\n{pane}");
        if no_color {
            assert!(!has_escape(&with_escapes), "NO_COLOR, yet escapes:\n{with_escapes:?}");
        } else {
            assert!(with_escapes.contains("\u{1b}["), "a terminal gets colour by default:\n{with_escapes:?}");
        }
    }
}

/// Runs `cmd` with stdout and stderr piped until `during` has run (it gets a reader of stdout
/// so far, to await a line), then stops it with SIGTERM; returns (stdout, stderr).
fn run_piped(mut cmd: Command, during: impl FnOnce(&dyn Fn() -> String)) -> (String, String) {
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start bindtrace");
    let collect = |mut from: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                writer.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (buf, thread)
    };
    let (err, err_thread) = collect(Box::new(child.stderr.take().unwrap()));
    let (out, out_thread) = collect(Box::new(child.stdout.take().unwrap()));
    let text = |buf: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    await_some("bindtrace: ready", || {
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{}", text(&err));
        text(&err).contains("bindtrace: ready").then_some(())
    });
    during(&|| text(&out));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    out_thread.join().unwrap();
    err_thread.join().unwrap();
    assert!(status.success(), "bindtrace failed:\n{}", text(&err));
    (text(&out), text(&err))
}

/// 2. Piped (the default `auto` form, stdout not a terminal): one line per event, no colour even
///    when CLICOLOR_FORCE asks for it, no escape sequence; stderr in the same time format, its
///    start-up summary short, interface churn not in it.
#[test]
fn piped_output_is_one_plain_line_per_event() {
    if skip_without_docker() {
        return;
    }
    let img = Image::busybox();
    let (c, port) = loopback_container(&img);
    let mut cmd = Command::new(binary());
    cmd.args(["--no-metrics", "--fold-window", "10m"]).env("CLICOLOR_FORCE", "1").env_remove("NO_COLOR");
    let (out, err) = run_piped(cmd, |stdout| {
        let refuse = || {
            let (code, _) = curl(&format!("http://localhost:{port}/"));
            assert!(code == 52 || code == 56, "curl: {code}");
        };
        refuse();
        // The first line written (its count read) before the next two refusals: they are
        // then one folded line, whatever the machine's load.
        let first = |s: String| s.lines().any(|l| l.contains(" refused ") && l.contains(&c.name));
        await_some("the first refused line", || first(stdout()).then_some(()));
        refuse();
        refuse();
    });
    assert!(!has_escape(&out), "escapes on stdout:\n{out:?}");
    // stderr is the log, which CLICOLOR_FORCE may colour (its level tags): not checked here.
    let mine: Vec<&str> = out.lines().filter(|l| l.contains(&c.name)).collect();
    for l in out.lines() {
        assert!(starts_with_rfc3339(l), "every line is one event and starts with its time: {l:?}\n{out}");
        let event = [" refused ", " audit ", " lost ", " the kernel skipped "];
        assert!(event.iter().any(|e| l.contains(e)), "{l}");
    }
    // The first refusal at once, the other two folded into one line at exit; and the audit.
    let refused: Vec<&&str> = mine.iter().filter(|l| l.contains(" refused ")).collect();
    assert_eq!(refused.len(), 2, "{out}");
    assert!(refused[1].contains(" [x2]"), "{}", refused[1]);
    assert!(refused.iter().all(|l| l.contains("loopback_only")), "{out}");
    assert!(mine.iter().any(|l| l.contains(" audit container ")), "{out}");
    // stderr: RFC 3339 with milliseconds, the offset inside the brackets.
    for l in err.lines().filter(|l| l.starts_with('[')) {
        assert!(starts_with_rfc3339(&l[1..]), "{l}");
    }
    let startup: Vec<&str> = err.lines().take_while(|l| !l.contains("bindtrace: ready")).collect();
    assert!(startup.len() <= 5, "a start-up summary of at most five lines:\n{}", startup.join("\n"));
    let churn = err.lines().any(|l| l.contains(": watching ") && l.contains("(netns "));
    assert!(!churn, "interface churn is at debug level:\n{err}");
}

/// One SYN to each of [`SCANNED_PORTS`] ports of `target`, none listening; returns the flood's
/// count of SYNs sent.
fn scan(topo: &Topology, target: std::net::IpAddr) -> u64 {
    let ports: Vec<u16> = (1..=SCANNED_PORTS).collect();
    syn_flood(&topo.host, target, &ports, ports.len() as u64, 2, Duration::from_secs(60)).sent
}

fn bindtrace_in(topo: &Topology, format: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.host.name, &binary()]).args([
        "--no-docker",
        "--no-metrics",
        "--hook",
        Hook::TcpSendReset.arg(),
        "--format",
        format,
        // The scan ends at exit, whatever the machine's load: one SCAN line, deterministically.
        "--scan-window",
        "10m",
    ]);
    cmd
}

/// 5. A scan of 1 000 ports of one namespace: on the terminal form ten blocks and one SCAN line
///    with the count and the range; as JSON, 1 000 objects, one per port.
#[test]
fn a_port_scan_is_one_scan_line_on_the_terminal_and_one_object_per_port_in_json() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    let scanned = topo.container();

    let (out, err) = run_piped(bindtrace_in(&topo, "terminal"), |_| {
        assert_eq!(scan(&topo, scanned.ipv4), SCANNED_PORTS as u64, "every SYN went out");
    });
    let scans: Vec<&str> = out.lines().filter(|l| l.contains(" SCAN ")).collect();
    assert_eq!(scans.len(), 1, "one SCAN line:\n{out}\nstderr:\n{err}");
    let workload = format!("netns {}", scanned.ns.inode());
    assert!(
        scans[0].contains(&format!("SCAN {workload}: 1000 ports refused (1-1000), 10 shown above")),
        "{}",
        scans[0]
    );
    assert!(starts_with_rfc3339(scans[0]), "{}", scans[0]);
    let headlines = out.lines().filter(|l| l.contains(" REFUSED ")).count();
    assert_eq!(headlines, 10, "the first ten ports before the scan was recognised:\n{out}");
    assert!(out.contains("990 refusals of the ports not shown"), "{out}");
    assert!(out.lines().count() < 200, "collapsed: {} lines", out.lines().count());

    let (out, err) = run_piped(bindtrace_in(&topo, "json"), |_| {
        assert_eq!(scan(&topo, scanned.ipv4), SCANNED_PORTS as u64, "every SYN went out");
    });
    let refused: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["event"] == "refused")
        .collect();
    let ports: BTreeSet<u64> = refused.iter().map(|v| v["target_port"].as_u64().unwrap()).collect();
    assert_eq!(refused.len(), SCANNED_PORTS as usize, "one object per port; stderr:\n{err}");
    assert_eq!(ports.len(), SCANNED_PORTS as usize);
    assert_eq!((ports.first(), ports.last()), (Some(&1), Some(&1000)));
}
