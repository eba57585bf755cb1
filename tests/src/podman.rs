//! Rootful podman for tests: its Docker-compatible API served by a `podman system service` of
//! the test's own (a unique socket under /run, killed on drop), a busybox image imported from a
//! rootfs (no registry), and containers removed on drop (also when a test panics).
//!
//! Podman runs without a daemon, so the service is the test's process: the machine's own
//! `podman.socket` unit, if any, is never touched.
use std::{
    net::IpAddr,
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::docker::unique_name;

/// Whether podman is installed here (tests fail without it under `CI`).
pub fn available() -> bool {
    Command::new("podman")
        .args(["version", "--format", "{{.Client.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn podman(args: &[&str]) -> Output {
    Command::new("podman").args(args).stdin(Stdio::null()).output().expect("run podman")
}

/// `podman ARGS`, panicking with its stderr on failure; returns stdout, trimmed.
pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(out.status.success(), "podman {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `podman system service --time=0` on a socket of its own; killed and its socket removed on
/// drop.
pub struct Service {
    pub socket: PathBuf,
    child: Child,
}

impl Service {
    /// Starts the service and waits until its socket accepts (podman creates the socket before
    /// it serves; a connection that succeeds is answered).
    pub fn start() -> Service {
        Service::start_at(PathBuf::from(format!("/run/{}.sock", unique_name("podman"))))
    }

    /// The same on `socket` (its directory must exist).
    pub fn start_at(socket: PathBuf) -> Service {
        Service::start_with(Command::new("podman"), socket)
    }

    /// The same with `podman` as `cmd` sets it up (global flags, environment).
    pub fn start_with(mut cmd: Command, socket: PathBuf) -> Service {
        let _ = std::fs::remove_file(&socket);
        let child = cmd
            .args(["system", "service", "--time=0", &format!("unix://{}", socket.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman system service");
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

    pub fn path(&self) -> &str {
        self.socket.to_str().unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Debian's static busybox and a page under /www, made with `podman import`. Removed on drop.
pub struct Image {
    pub tag: String,
}

impl Image {
    pub fn busybox() -> Image {
        Image::busybox_with(|| Command::new("podman"))
    }

    /// The same image, imported by the podman `podman()` sets up.
    pub fn busybox_with(podman: impl Fn() -> Command) -> Image {
        // podman qualifies a bare name with localhost/, and reports it so.
        let tag = format!("localhost/{}:busybox", unique_name("pimg"));
        let root = std::env::temp_dir().join(unique_name("prootfs"));
        for dir in ["bin", "www", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
        for applet in ["sh", "httpd", "sleep"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), "hello from a bindtrace test\n").unwrap();
        let mut tar = Command::new("tar")
            .args(["-C", root.to_str().unwrap(), "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let out = podman()
            .args(["import", "-q", "-", &tag])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .expect("podman import");
        let _ = tar.wait();
        let _ = std::fs::remove_dir_all(&root);
        assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
        Image { tag }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rmi", "-f", &self.tag]);
    }
}

/// A container started with `podman run -d`, removed (with `-f`) on drop.
pub struct Container {
    pub name: String,
    pub id: String,
}

impl Container {
    /// `podman run -d --name <unique> OPTS IMAGE CMD...`. The file and process limits are
    /// set explicitly: podman's defaults (1048576 files) exceed the hard limits some hosts
    /// (this one's sandbox among them) give root, and runc then fails to start anything.
    pub fn run(image: &Image, opts: &[&str], cmd: &[&str]) -> Container {
        let name = unique_name("pctr");
        let mut args =
            vec!["run", "-d", "--name", &name, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];
        args.extend_from_slice(opts);
        args.push(&image.tag);
        args.extend_from_slice(cmd);
        let id = podman_ok(&args);
        Container { name, id }
    }

    pub fn inspect(&self, format: &str) -> String {
        podman_ok(&["inspect", "--format", format, &self.name])
    }

    /// Host pid of the main process.
    pub fn pid(&self) -> u32 {
        self.inspect("{{.State.Pid}}").parse().unwrap()
    }

    /// Address on the default network (`podman`).
    pub fn ip(&self) -> IpAddr {
        self.inspect("{{.NetworkSettings.IPAddress}}")
            .parse()
            .unwrap_or_else(|e| panic!("{} has no address: {e}", self.name))
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Waits until the container's main process listens on `port`; panics after 10 s.
    pub fn wait_listening(&self, port: u16) {
        crate::proc::wait_socket(self.pid(), port, crate::proc::Bound::TcpListening, &self.name);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// A run directory of the test's own (what `--run-dir` names instead of /run), with tmpfs
/// mounts on `user/UID` as a login makes them; unmounted and removed on drop.
pub struct RunDir {
    pub path: PathBuf,
    mounts: Vec<PathBuf>,
}

impl RunDir {
    pub fn new() -> RunDir {
        let path = std::env::temp_dir().join(unique_name("rundir"));
        std::fs::create_dir_all(&path).unwrap();
        RunDir { path, mounts: Vec::new() }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// What a login of user `uid` does: `user/UID` made and a tmpfs mounted on it.
    pub fn login(&mut self, uid: u32) -> PathBuf {
        let dir = self.path.join(format!("user/{uid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounts.push(dir.clone());
        dir
    }
}

impl Default for RunDir {
    fn default() -> Self {
        RunDir::new()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Rootful podman with the CNI backend, in a world of its own: a private containers.conf
/// (`CONTAINERS_CONF`: `network_backend = "cni"`, Debian's plugins in /usr/lib/cni, a private
/// network config directory and tmp dir), private storage and run roots (vfs: no mounts to
/// leave behind). Its containers and networks are removed and its directory deleted on drop.
pub struct CniPodman {
    pub dir: PathBuf,
}

impl CniPodman {
    pub fn new() -> CniPodman {
        let dir = std::env::temp_dir().join(unique_name("cnipodman"));
        for sub in ["net.d", "tmp", "root", "runroot"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\"]\n\
             network_config_dir = \"{0}/net.d\"\n[engine]\ntmp_dir = \"{0}/tmp\"\nevents_logger = \"file\"\n",
            dir.display()
        );
        std::fs::write(dir.join("containers.conf"), conf).unwrap();
        CniPodman { dir }
    }

    /// `podman` with this world's configuration and roots.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .stdin(Stdio::null());
        cmd
    }

    /// `podman ARGS` here, panicking with its stderr on failure; stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("run podman");
        assert!(out.status.success(), "podman {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Default for CniPodman {
    fn default() -> Self {
        CniPodman::new()
    }
}

impl Drop for CniPodman {
    fn drop(&mut self) {
        let _ = self.command().args(["rm", "-af", "-t", "0"]).output();
        let _ = self.command().args(["network", "prune", "-f"]).output();
        let _ = self.command().args(["rmi", "-af"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
