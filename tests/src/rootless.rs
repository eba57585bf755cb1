//! A rootless podman user for tests: made with `useradd`, given subordinate ids and
//! `/dev/net/tun` (an ACL, for slirp4netns), a runtime directory and a containers.conf without
//! systemd; its image, containers and `podman system service` run as that user. Everything is
//! undone on drop, also when a test panics: the user's processes (killed by pid), the user and
//! its home (`userdel -r`), its /etc/subuid and /etc/subgid lines, the ACL, the runtime
//! directory.
use std::{
    fs,
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::docker::unique_name;

const TUN: &str = "/dev/net/tun";
/// Subordinate ids per user, as useradd gives them.
const SUBIDS: u64 = 65_536;

/// Whether the tools the rootless tests need are installed (they fail without them under `CI`).
pub fn available() -> Option<&'static str> {
    let has = |p: &str| Path::new(p).exists();
    for (path, what) in [
        ("/usr/bin/podman", "podman"),
        ("/usr/bin/slirp4netns", "slirp4netns"),
        ("/usr/bin/newuidmap", "uidmap"),
        ("/usr/bin/setfacl", "acl"),
        ("/usr/sbin/useradd", "passwd (useradd)"),
    ] {
        if !has(path) {
            return Some(what);
        }
    }
    None
}

pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `XDG_RUNTIME_DIR`: /run/user/UID, as a login would make it.
    pub runtime_dir: PathBuf,
    tun_acl: bool,
}

impl User {
    /// A new user with subordinate ids, `/dev/net/tun` usable, and podman set up without
    /// systemd (cgroupfs, a file for events): no login session exists to give it either.
    pub fn create() -> User {
        let name = unique_name("rootless");
        run_ok("useradd", &["--create-home", "--shell", "/bin/sh", &name]);
        let id = |flag: &str| -> u32 {
            String::from_utf8_lossy(&run_ok("id", &[flag, &name]).stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let home = PathBuf::from(format!("/home/{name}"));
        let runtime_dir = PathBuf::from(format!("/run/user/{uid}"));
        // From here on the guard cleans up whatever follows, also a failure half-way.
        let mut user = User { name, uid, gid, home, runtime_dir, tun_acl: false };
        user.add_subids();
        run_ok("setfacl", &["-m", &format!("u:{}:rw", user.name), TUN]);
        user.tun_acl = true;
        fs::create_dir_all(user.runtime_dir.join("podman")).unwrap();
        let conf = user.home.join(".config/containers");
        fs::create_dir_all(&conf).unwrap();
        fs::write(
            conf.join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        fs::set_permissions(&user.runtime_dir, fs::Permissions::from_mode(0o700)).unwrap();
        for dir in [&user.runtime_dir, &user.home.join(".config")] {
            run_ok("chown", &["-R", &format!("{}:{}", user.uid, user.gid), dir.to_str().unwrap()]);
        }
        user
    }

    /// useradd gives subordinate ids where /etc/subuid exists; where it gave none, a range
    /// above every range listed.
    fn add_subids(&self) {
        let listed = |file: &str| fs::read_to_string(file).unwrap_or_default();
        let mine = format!("{}:", self.name);
        if listed("/etc/subuid").lines().any(|l| l.starts_with(&mine))
            && listed("/etc/subgid").lines().any(|l| l.starts_with(&mine))
        {
            return;
        }
        let end = ["/etc/subuid", "/etc/subgid"]
            .iter()
            .flat_map(|f| listed(f).lines().map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|l| {
                let mut f = l.split(':').skip(1);
                Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
            })
            .max()
            .unwrap_or(0)
            .max(100_000);
        let range = format!("{end}-{}", end + SUBIDS - 1);
        run_ok("usermod", &["--add-subuids", &range, "--add-subgids", &range, &self.name]);
    }

    /// `program ARGS` as this user, in its environment (what a login would set), from `/`.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([&format!("--reuid={}", self.uid), &format!("--regid={}", self.gid), "--init-groups", "--"])
            .arg(program)
            .args(args)
            .env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .current_dir("/")
            .stdin(Stdio::null());
        cmd
    }

    pub fn podman(&self, args: &[&str]) -> Output {
        self.command("podman", args).output().expect("run podman as the test user")
    }

    /// `podman ARGS` as this user, panicking with its stderr on failure; stdout, trimmed.
    pub fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {} (as {}): {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Debian's static busybox and a page under /www, imported into the user's own storage
    /// from a tar built here (no registry). Goes with the user's home.
    pub fn busybox_image(&self) -> String {
        let tag = format!("localhost/{}:busybox", unique_name("rlimg"));
        let root = std::env::temp_dir().join(unique_name("rlrootfs"));
        for dir in ["bin", "www", "tmp"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
        for applet in ["sh", "httpd", "sleep", "wget"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        fs::write(root.join("www/index.html"), "hello from a bindtrace test\n").unwrap();
        let tar = root.with_extension("tar");
        run_ok("tar", &["-C", root.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
        let _ = fs::remove_dir_all(&root);
        fs::set_permissions(&tar, fs::Permissions::from_mode(0o644)).unwrap();
        let out = self.podman(&["import", "-q", tar.to_str().unwrap(), &tag]);
        let _ = fs::remove_file(&tar);
        assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
        tag
    }

    /// `podman run -d` as this user, with the limits this host's hard RLIMIT_NOFILE allows
    /// (podman's default of 1048576 files fails here).
    pub fn run(&self, image: &str, opts: &[&str], cmd: &[&str]) -> Container<'_> {
        let name = unique_name("rlctr");
        let mut args =
            vec!["run", "-d", "--name", &name, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];
        args.extend_from_slice(opts);
        args.push(image);
        args.extend_from_slice(cmd);
        let id = self.podman_ok(&args);
        Container { user: self, name, id }
    }

    /// The user's `podman system service` on its default socket,
    /// /run/user/UID/podman/podman.sock, as `systemctl --user start podman.socket` would serve.
    pub fn service(&self) -> Service {
        let socket = self.runtime_dir.join("podman/podman.sock");
        let child = self
            .command("podman", &["system", "service", "--time=0", &format!("unix://{}", socket.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman system service as the test user");
        let service = Service { socket, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&service.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "podman system service never opened {}",
                service.socket.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    /// Pids of every process running as this user.
    fn processes(&self) -> Vec<i32> {
        let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Uid:"))
                        .and_then(|u| u.split_whitespace().next()?.parse::<u32>().ok())
                        == Some(self.uid)
                })
            })
            .collect()
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        // podman's pause process, slirp4netns, rootlessport and conmon outlive the commands:
        // every process of this user (made by this test) is ended by its pid.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() > deadline {
                if !left.is_empty() {
                    eprintln!("processes of {} still running: {left:?}", self.name);
                }
                break;
            }
            for pid in left {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.tun_acl {
            report(run("setfacl", &["-x", &format!("u:{}", self.name), TUN]), "setfacl -x");
        }
        report(run("userdel", &["-r", &self.name]), "userdel -r");
        // userdel removes the user's subordinate ids; a line it left is removed here.
        for file in ["/etc/subuid", "/etc/subgid"] {
            if let Ok(text) = fs::read_to_string(file) {
                let mine = format!("{}:", self.name);
                if text.lines().any(|l| l.starts_with(&mine)) {
                    let kept: String =
                        text.lines().filter(|l| !l.starts_with(&mine)).map(|l| format!("{l}\n")).collect();
                    let _ = fs::write(file, kept);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.runtime_dir);
        // Rootless storage holds files of subordinate ids userdel may leave behind.
        let _ = fs::remove_dir_all(&self.home);
    }
}

fn run(program: &str, args: &[&str]) -> std::io::Result<Output> {
    Command::new(program).args(args).stdin(Stdio::null()).output()
}

fn run_ok(program: &str, args: &[&str]) -> Output {
    let out = run(program, args).unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

fn report(out: std::io::Result<Output>, what: &str) {
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!("{what}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("{what}: {e}"),
    }
}

/// The user's `podman system service`; killed on drop (its socket goes with the runtime
/// directory).
pub struct Service {
    pub socket: PathBuf,
    child: Child,
}

impl Service {
    pub fn path(&self) -> &str {
        self.socket.to_str().unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rootless container, removed on drop.
pub struct Container<'a> {
    user: &'a User,
    pub name: String,
    pub id: String,
}

impl Container<'_> {
    pub fn inspect(&self, format: &str) -> String {
        self.user.podman_ok(&["inspect", "--format", format, &self.name])
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Host pid of the main process.
    pub fn pid(&self) -> u32 {
        self.inspect("{{.State.Pid}}").parse().unwrap()
    }

    /// `podman exec` as the user.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        self.user.podman(&args)
    }

    /// Waits until the container's main process listens on `port`; panics after 10 s.
    pub fn wait_listening(&self, port: u16) {
        let pid = self.pid();
        let want = format!(":{port:04X} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listening = ["tcp", "tcp6"].iter().any(|t| {
                fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.split_whitespace().nth(3) == Some("0A") && l.contains(&want))
            });
            if listening {
                return;
            }
            assert!(Instant::now() < deadline, "{} never listened on {port}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.user.podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}
