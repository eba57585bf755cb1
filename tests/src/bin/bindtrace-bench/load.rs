//! Running the load generator (bindtrace-loadgen, next to this binary) in the client namespace,
//! pinned to the generator CPU, and a bounded burst of out-of-scope UDP drops.
use std::{net::IpAddr, path::PathBuf, process::Command};

use bindtrace_tests::Netns;
use serde_json::Value;

/// What the generator reported.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub refused: u64,
    pub seconds: f64,
    pub refused_per_sec: f64,
}

fn loadgen() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.with_file_name("bindtrace-loadgen")
}

/// How the generator is driven.
pub struct Shape<'a> {
    pub target: IpAddr,
    pub ports: (u16, u16),
    pub seconds: f64,
    pub rate: Option<u32>,
    pub max: Option<u64>,
    pub extra: &'a [&'a str],
}

pub fn run(ns: &Netns, cpu: usize, shape: &Shape) -> anyhow::Result<Load> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "ip", "netns", "exec", &ns.name])
        .arg(loadgen())
        .args(["--target", &shape.target.to_string()])
        .args(["--ports", &format!("{}-{}", shape.ports.0, shape.ports.1)])
        .args(["--seconds", &shape.seconds.to_string()]);
    if let Some(rate) = shape.rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    if let Some(max) = shape.max {
        cmd.args(["--max", &max.to_string()]);
    }
    cmd.args(shape.extra);
    let out = cmd.output().map_err(|e| anyhow::anyhow!("running bindtrace-loadgen: {e}"))?;
    if !out.status.success() {
        anyhow::bail!("bindtrace-loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let num = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(Load {
        refused: num("refused") as u64,
        seconds: num("seconds"),
        refused_per_sec: num("refused_per_sec"),
    })
}

/// Sends `count` UDP datagrams to a closed port on `ns`'s own loopback: each is dropped with
/// reason NO_SOCKET, so the kfree_skb tracepoint runs for packets that are not bindtrace's.
pub fn udp_drops(ns: &Netns, count: u32) {
    ns.run(|| {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        for _ in 0..count {
            // Port 9 (discard) has no socket in a namespace of our own.
            let _ = sock.send_to(b"x", "127.0.0.1:9");
        }
    });
}

/// `count` ordinary TCP exchanges on `ns`'s loopback (connect, 64 bytes each way, close): the
/// packets of healthy traffic, which the kernel consumes rather than drops.
pub fn ordinary_tcp(ns: &Netns, count: u32) {
    use std::io::{Read, Write};
    ns.run(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::scope(|s| {
            s.spawn(|| {
                for conn in listener.incoming().take(count as usize) {
                    let Ok(mut conn) = conn else { continue };
                    let mut buf = [0u8; 64];
                    if conn.read_exact(&mut buf).is_ok() {
                        let _ = conn.write_all(&buf);
                    }
                }
            });
            for _ in 0..count {
                let Ok(mut c) = std::net::TcpStream::connect(addr) else { continue };
                let mut buf = [7u8; 64];
                let _ = c.write_all(&buf);
                let _ = c.read_exact(&mut buf);
            }
        });
    });
}
