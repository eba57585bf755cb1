//! Userspace side of the connect tracker (`bindtrace-ebpf/src/connect.rs`): which prefixes to
//! watch, and who connected with a given 4-tuple: over TCP to a given namespace
//! (`CONNECTORS`), or over UDP (`UDP_CONNECTORS`).
use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{BtfTracePoint, FExit},
};
use bindtrace_common::{
    Addr16, CONNECT_STAT_FROM_PARKED, CONNECT_STAT_UNATTRIBUTED, CONNECT_STATE_PARKING, ConnectKey, Connector,
};

use crate::{
    kernel::clock::monotonic_ns,
    netns::prefixes::{Prefix, addr16, show_prefix},
};

/// The tracker: a reset reaching a connecting socket.
const PROGRAM: &str = "bt_receive_reset";
const TRACEPOINT: &str = "tcp_receive_reset";
/// Parking: every TCP state change, attached only once a reset was processed in a softirq.
const PARKING_PROGRAM: &str = "bt_sock_set_state";
const PARKING_TRACEPOINT: &str = "inet_sock_set_state";
/// The UDP connect recorders (`bindtrace-ebpf/src/probes/udp_connect.rs`) and their functions.
const UDP_PROGRAMS: [(&str, &str); 2] =
    [("fx_udp4_connect", "__ip4_datagram_connect"), ("fx_udp6_connect", "__ip6_datagram_connect")];

/// Who made a connection, as the kernel recorded it when the reset reached its socket (or, once
/// parking is on, when the socket entered SYN_SENT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectorInfo {
    /// Process id in the initial pid namespace.
    pub(crate) pid: u32,
    pub(crate) comm: String,
    pub(crate) netns_ino: u32,
}

impl From<Connector> for ConnectorInfo {
    fn from(c: Connector) -> Self {
        let end = c.comm.iter().position(|&b| b == 0).unwrap_or(c.comm.len());
        ConnectorInfo {
            pid: c.tgid,
            comm: String::from_utf8_lossy(&c.comm[..end]).into_owned(),
            netns_ino: c.netns_ino,
        }
    }
}

pub(crate) struct ConnectTracker {
    dests: LpmTrie<MapData, Addr16, u32>,
    connectors: HashMap<MapData, ConnectKey, Connector>,
    installed: BTreeSet<Prefix>,
    /// None where the UDP recorders could not be attached (said once at start-up).
    udp: Option<UdpConnects>,
    /// The per-CPU counts of wanted refused connects (`CONNECT_STATS`).
    stats: PerCpuArray<MapData, u64>,
    /// `CONNECT_STATE`: userspace turns parking on there once its program is attached.
    state: Array<MapData, u64>,
    parking: Parking,
    /// Refusals whose connector went unrecorded, as last said.
    unattributed_said: u64,
}

/// The parking program (`inet_sock_set_state`): verified at start, attached when needed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parking {
    Loaded,
    On,
    /// It could not be loaded or attached, and why (5.10's verifier refuses that tracepoint's
    /// `const struct sock *` argument).
    Unavailable(String),
}

/// What the connect tracker's kernel side counted (see `bindtrace-ebpf/src/connect.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ConnectStats {
    /// Sampled refusals whose reset reached the socket in a softirq with nothing parked. The
    /// first of them has userspace switch parking on.
    pub(crate) unattributed: u64,
    /// Sampled refusals attributed from a parked record.
    pub(crate) from_parked: u64,
}

impl ConnectStats {
    /// The warning for refusals gone unattributed since `said` (None when there are none).
    /// `parking`: None when it is on, else why it is unavailable.
    pub(crate) fn warning(&self, said: u64, parking: Option<&str>) -> Option<String> {
        (self.unattributed > said).then(|| {
            let remedy = match parking {
                None => format!(
                    "connects to the watched bridges are recorded as they start since the first of them \
                     ({} refusals attributed from those records so far)",
                    self.from_parked
                ),
                Some(why) => format!("recording connects as they start is unavailable here ({why})"),
            };
            format!(
                "{} sampled refusals since start had their reset reach the connecting socket outside \
                 the connecting task (receive packet steering, or a softirq deferred to ksoftirqd), so \
                 their lines do not name the connecting process; {remedy}",
                self.unattributed,
            )
        })
    }
}

/// The kernel's record of UDP sockets connected to the watched prefixes: a handle the
/// enrichment worker reads (one map lookup per UDP line), cloned for each batch.
#[derive(Clone)]
pub(crate) struct UdpConnects {
    map: Arc<HashMap<MapData, ConnectKey, Connector>>,
    /// How long after a refusal its record may still be missing: none when the connect itself
    /// is recorded (before the datagram left); with only the refused reads, until the socket's
    /// owner was woken by the error and read it.
    settle: Duration,
}

/// How long the owner of a refused UDP socket may take to read the error, after the refusal.
const READ_SETTLE: Duration = Duration::from_millis(50);
/// How often the record is looked for meanwhile.
const READ_POLL: Duration = Duration::from_millis(2);

impl std::fmt::Debug for UdpConnects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdpConnects")
    }
}

impl UdpConnects {
    /// Who last connected a UDP socket from `client` to `target`, if the kernel recorded it.
    pub(crate) fn lookup(&self, client: SocketAddr, target: SocketAddr) -> Option<ConnectorInfo> {
        // Recorded at connect(), before any refusal: no refused namespace to key by (0).
        self.map.get(&connect_key(0, client, target), 0).ok().map(ConnectorInfo::from)
    }

    /// [`Self::lookup`], looked for again until [`Self::settle`] after the refusal at
    /// `refused_ns` (CLOCK_MONOTONIC) when it is not there yet; a line written later than that
    /// does not wait.
    pub(crate) fn lookup_settled(
        &self,
        client: SocketAddr,
        target: SocketAddr,
        refused_ns: Option<u64>,
    ) -> Option<ConnectorInfo> {
        let deadline = refused_ns.map_or(0, |t| t.saturating_add(self.settle.as_nanos() as u64));
        loop {
            if let Some(who) = self.lookup(client, target) {
                return Some(who);
            }
            if monotonic_ns() >= deadline {
                return None;
            }
            std::thread::sleep(READ_POLL);
        }
    }
}

/// The map key of a connection from `client` to `target`, as the kernel side builds it: both
/// addresses IPv4-mapped for IPv4, ports in host order.
pub(crate) fn connect_key(refused_netns: u64, client: SocketAddr, target: SocketAddr) -> ConnectKey {
    ConnectKey {
        refused_netns_cookie: refused_netns,
        client_addr: addr16(client.ip()),
        target_addr: addr16(target.ip()),
        client_port: client.port(),
        target_port: target.port(),
        _pad: 0,
    }
}

/// Where fexit cannot be loaded: the refused read (`tp_btf/sock_recv_length`, Linux 6.3+).
const UDP_READ_PROGRAM: (&str, &str) = ("bt_sock_recv_length", "sock_recv_length");

/// What the tracker's programs attach to, for the BTF their loads are given
/// ([`crate::kernel::btf::ProgramTypes::aya_btf`]).
pub(crate) const TRACEPOINTS: [&str; 3] = [TRACEPOINT, PARKING_TRACEPOINT, UDP_READ_PROGRAM.1];
pub(crate) const FUNCTIONS: [&str; 2] = [UDP_PROGRAMS[0].1, UDP_PROGRAMS[1].1];

/// Which of the UDP recorders are attached, for the start-up message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UdpRecorders {
    /// The fexit pair on the connects, or why not.
    pub(crate) connects: Result<(), String>,
    /// The refused reads, or why not.
    pub(crate) reads: Result<(), String>,
}

impl UdpRecorders {
    /// The start-up line, and whether it is a warning (nothing records UDP connectors).
    pub(crate) fn describe(&self) -> (bool, String) {
        const CONNECTS: &str = "fexit/__ip4_datagram_connect and fexit/__ip6_datagram_connect";
        const READS: &str = "tp_btf/sock_recv_length";
        match (&self.connects, &self.reads) {
            (Ok(()), Ok(())) => (false, format!("UDP connectors: recorded by {CONNECTS}, and by {READS}")),
            (Ok(()), Err(_)) => (false, format!("UDP connectors: recorded by {CONNECTS}")),
            (Err(e), Ok(())) => (
                false,
                format!("UDP connectors: recorded by {READS}, from the refused reads (fexit: {})", brief(e)),
            ),
            (Err(c), Err(r)) => (
                true,
                format!(
                    "not recording UDP connects ({c}; {r}): a datagram through docker-proxy is attributed \
                     only while the proxy's socket for it is still open"
                ),
            ),
        }
    }
}

/// An attach error without the verifier's log when it said nothing (aya appends
/// "Verifier output: " even then), for a start-up line every user reads.
fn brief(e: &str) -> &str {
    e.trim_end().strip_suffix("Verifier output:").map_or(e, |s| s.trim_end().trim_end_matches('.'))
}

/// The BTF tracepoint program `name` of the object.
fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut BtfTracePoint> {
    use anyhow::Context as _;
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()?)
}

/// A load error with only the verifier's first line (its reason; the rest is the program), for
/// a reason said in one line.
fn gist(e: &str) -> String {
    match e.split_once("Verifier output:") {
        Some((head, log)) => match log.lines().map(str::trim).find(|l| !l.is_empty()) {
            Some(first) => format!("{}: {first}", head.trim_end().trim_end_matches('.')),
            None => brief(e).to_owned(),
        },
        None => e.to_owned(),
    }
}

/// Loads and attaches the UDP recorders: the fexit pair (both or none: whatever was attached is
/// detached again when one fails), and the refused-read tracepoint; each is optional.
fn attach_udp(ebpf: &mut Ebpf, btf: &aya::Btf) -> (Option<UdpConnects>, UdpRecorders) {
    let mut loaded = Vec::new();
    let mut attach = |ebpf: &mut Ebpf, name: &'static str, function: &str| -> Result<(), String> {
        let program: &mut FExit = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        program.load(function, btf).map_err(|e| format!("loading fexit/{function}: {e}"))?;
        loaded.push(name);
        program.attach().map_err(|e| format!("attaching fexit/{function}: {e}"))?;
        Ok(())
    };
    let connects = UDP_PROGRAMS.iter().try_for_each(|(name, function)| attach(ebpf, name, function));
    if connects.is_err() {
        loaded.into_iter().for_each(|name| unload(ebpf, name));
    }
    // The refused-read tracepoint runs on every recvmsg() on the host: only where the connects
    // cannot be recorded (fexit refused) is it worth that.
    let reads = (|| -> Result<(), String> {
        if connects.is_ok() {
            return Err("not needed: the connects are recorded".to_owned());
        }
        let (name, tracepoint) = UDP_READ_PROGRAM;
        let program: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        program.load(tracepoint, btf).map_err(|e| format!("loading tp_btf/{tracepoint}: {e}"))?;
        if let Err(e) = program.attach() {
            unload(ebpf, name);
            return Err(format!("attaching tp_btf/{tracepoint}: {e}"));
        }
        Ok(())
    })();
    let recorders = UdpRecorders { connects, reads };
    if recorders.connects.is_err() && recorders.reads.is_err() {
        return (None, recorders);
    }
    let map = ebpf
        .take_map("UDP_CONNECTORS")
        .ok_or_else(|| "no map UDP_CONNECTORS".to_owned())
        .and_then(|m| HashMap::try_from(m).map_err(|e| e.to_string()));
    match map {
        Ok(map) => {
            let settle = if recorders.connects.is_ok() { Duration::ZERO } else { READ_SETTLE };
            (Some(UdpConnects { map: Arc::new(map), settle }), recorders)
        }
        Err(e) => {
            // Nothing left attached that fills a map nobody reads.
            for name in UDP_PROGRAMS.iter().map(|p| p.0).chain([UDP_READ_PROGRAM.0]) {
                unload(ebpf, name);
            }
            (None, UdpRecorders { connects: Err(e.clone()), reads: Err(e) })
        }
    }
}

/// Detaches and unloads one of the UDP recorders (a no-op for one that is not loaded).
fn unload(ebpf: &mut Ebpf, name: &str) {
    let result = match ebpf.program_mut(name) {
        Some(aya::programs::Program::FExit(p)) if p.fd().is_ok() => p.unload(),
        Some(aya::programs::Program::BtfTracePoint(p)) if p.fd().is_ok() => p.unload(),
        _ => Ok(()),
    };
    if let Err(e) = result {
        log::warn!("detaching {name} after a failed attach: {e}");
    }
}

impl ConnectTracker {
    /// Loads and attaches `tp_btf/tcp_receive_reset` from the already loaded object (whose
    /// globals were set from [`crate::kernel::sock_layout::SockLayout`]), loads the parking
    /// program without attaching it (the BTF it needs is not kept), and takes their maps.
    pub(crate) fn attach(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<ConnectTracker> {
        use anyhow::Context as _;
        let program = tracepoint(ebpf, PROGRAM)?;
        program.load(TRACEPOINT, btf).with_context(|| format!("loading tp_btf/{TRACEPOINT}"))?;
        program.attach().with_context(|| format!("attaching tp_btf/{TRACEPOINT}"))?;
        let parking = tracepoint(ebpf, PARKING_PROGRAM).and_then(|p| {
            p.load(PARKING_TRACEPOINT, btf).with_context(|| format!("loading tp_btf/{PARKING_TRACEPOINT}"))
        });
        let parking = match parking {
            Ok(()) => Parking::Loaded,
            Err(e) => {
                let why = gist(&format!("{e:#}"));
                log::debug!("connect tracker: no parking ({why})");
                Parking::Unavailable(why)
            }
        };
        let dests = ebpf.take_map("CONNECT_DESTS").context("no map CONNECT_DESTS")?;
        let connectors = ebpf.take_map("CONNECTORS").context("no map CONNECTORS")?;
        let stats = ebpf.take_map("CONNECT_STATS").context("no map CONNECT_STATS")?;
        let state = ebpf.take_map("CONNECT_STATE").context("no map CONNECT_STATE")?;
        let (udp, recorders) = attach_udp(ebpf, btf);
        // Which recorder runs is a detail (debug); that none does is worth a warning.
        match recorders.describe() {
            (true, line) => log::warn!("{line}"),
            (false, line) => log::debug!("{line}"),
        }
        Ok(ConnectTracker {
            dests: LpmTrie::try_from(dests)?,
            connectors: HashMap::try_from(connectors)?,
            installed: BTreeSet::new(),
            udp,
            stats: PerCpuArray::try_from(stats)?,
            state: Array::try_from(state)?,
            parking,
            unattributed_said: 0,
        })
    }

    /// Attaches the parking program and tells the kernel side to defer softirq resets to it.
    /// In that order: a refusal deferred before the program ran would go uncounted.
    fn start_parking(&mut self, ebpf: &mut Ebpf) {
        if self.parking != Parking::Loaded {
            return;
        }
        let attached = (|| -> anyhow::Result<()> {
            use anyhow::Context as _;
            let program = tracepoint(ebpf, PARKING_PROGRAM)?;
            program.attach().with_context(|| format!("attaching tp_btf/{PARKING_TRACEPOINT}"))?;
            self.state.set(CONNECT_STATE_PARKING, 1, 0).context("turning parking on")?;
            Ok(())
        })();
        self.parking = match attached {
            Ok(()) => {
                log::info!(
                    "connect tracker: recording connects to the watched bridges as they start \
                     (tp_btf/{PARKING_TRACEPOINT}), for resets processed outside the connecting task"
                );
                Parking::On
            }
            Err(e) => {
                unload(ebpf, PARKING_PROGRAM);
                Parking::Unavailable(gist(&format!("{e:#}")))
            }
        };
    }

    /// The kernel side's counts, read now.
    pub(crate) fn stats(&self) -> ConnectStats {
        let sum = |slot: u32| self.stats.get(&slot, 0).map(|v| v.iter().copied().sum::<u64>()).unwrap_or(0);
        ConnectStats {
            unattributed: sum(CONNECT_STAT_UNATTRIBUTED),
            from_parked: sum(CONNECT_STAT_FROM_PARKED),
        }
    }

    /// Warns when refusals went unattributed since the last call (said when it grows, with the
    /// total: never once per refusal), parking from the first of them on.
    pub(crate) fn warn_unattributed(&mut self, ebpf: &mut Ebpf) {
        let stats = self.stats();
        if stats.unattributed > 0 {
            self.start_parking(ebpf);
        }
        let why = match &self.parking {
            Parking::Unavailable(why) => Some(why.as_str()),
            Parking::Loaded | Parking::On => None,
        };
        if let Some(line) = stats.warning(self.unattributed_said, why) {
            log::warn!("{line}");
            self.unattributed_said = stats.unattributed;
        }
    }

    /// The UDP connect record, for the enrichment worker (None where it is not attached).
    pub(crate) fn udp(&self) -> Option<UdpConnects> {
        self.udp.clone()
    }

    /// Makes the kernel's prefix set equal to `prefixes`.
    pub(crate) fn set_prefixes(&mut self, prefixes: &BTreeSet<Prefix>) {
        for p in self.installed.difference(prefixes).copied().collect::<Vec<_>>() {
            if let Err(e) = self.dests.remove(&Key::new(p.1, p.0)) {
                log::debug!("removing a watched prefix: {e}");
            }
            self.installed.remove(&p);
        }
        for p in prefixes.difference(&self.installed.clone()) {
            match self.dests.insert(&Key::new(p.1, p.0), 1, 0) {
                Ok(()) => {
                    self.installed.insert(*p);
                }
                Err(e) => log::warn!("watching connects to {}: {e}", show_prefix(p)),
            }
        }
    }

    /// Who connected from `client` to `target` and was refused in the namespace
    /// `refused_netns` (the refusal's own `netns_cookie`), if the kernel saw it. The same tuple
    /// refused in another namespace (a network that reuses these addresses) is another key.
    pub(crate) fn lookup(
        &self,
        refused_netns: u64,
        client: SocketAddr,
        target: SocketAddr,
    ) -> Option<ConnectorInfo> {
        self.connectors.get(&connect_key(refused_netns, client, target), 0).ok().map(ConnectorInfo::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_is_trimmed() {
        let mut c = Connector { tgid: 7, ..Default::default() };
        c.comm[..12].copy_from_slice(b"docker-proxy");
        let info = ConnectorInfo::from(c);
        assert_eq!(info.comm, "docker-proxy");
        assert_eq!(info.pid, 7);
    }

    /// Refusals gone unattributed are said when their total grows, never again for the same.
    #[test]
    fn unattributed_refusals_are_said_when_they_grow() {
        let stats = ConnectStats { unattributed: 1, from_parked: 0 };
        let line = stats.warning(0, None).expect("one unattributed");
        assert!(line.starts_with("1 sampled refusals") && line.contains("receive packet steering"), "{line}");
        assert!(line.contains("recorded as they start"), "{line}");
        assert_eq!(stats.warning(1, None), None);
        assert_eq!(ConnectStats::default().warning(0, None), None);
        // Where parking cannot load, the line says so instead of promising it.
        let line = stats.warning(0, Some("loading tp_btf/inet_sock_set_state: invalid argument")).unwrap();
        assert!(line.contains("unavailable here (loading tp_btf/inet_sock_set_state"), "{line}");
    }

    #[test]
    fn a_load_error_is_said_with_the_verifiers_reason_only() {
        let e = "loading tp_btf/inet_sock_set_state: the BPF_PROG_LOAD syscall returned Invalid argument \
                 (os error 22). Verifier output: arg#0 type is not a struct\nUnrecognized arg#0 type PTR\n0: (79) r2";
        assert_eq!(
            gist(e),
            "loading tp_btf/inet_sock_set_state: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22): \
             arg#0 type is not a struct"
        );
        assert_eq!(gist("no such program"), "no such program");
    }

    /// Start-up says which recorder runs, and warns only when none does.
    #[test]
    fn recorders_are_described() {
        let no = |why: &str| Err(why.to_owned());
        let (warn, line) = UdpRecorders { connects: no("EPERM"), reads: Ok(()) }.describe();
        assert!(!warn && line.contains("tp_btf/sock_recv_length") && line.contains("EPERM"), "{line}");
        let (warn, line) = UdpRecorders { connects: Ok(()), reads: no("no tracepoint") }.describe();
        assert!(!warn && line.contains("fexit/__ip4_datagram_connect"), "{line}");
        assert!(!line.contains("sock_recv_length"), "not attached where fexit is: {line}");
        let (_, line) = UdpRecorders {
            connects: no("loading fexit/f: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output: "),
            reads: Ok(()),
        }
        .describe();
        assert!(line.ends_with("(os error 1))"), "no empty verifier log: {line}");
        let (warn, line) = UdpRecorders { connects: no("EPERM"), reads: no("no tracepoint") }.describe();
        assert!(warn && line.starts_with("not recording UDP connects (EPERM; no tracepoint)"), "{line}");
    }

    /// The key userspace looks up is the one the kernel side writes: IPv4 mapped, as an IPv6
    /// socket dialing `::ffff:a.b.c.d` gives too, ports in host order, client first.
    #[test]
    fn keys_are_built_as_the_kernel_builds_them() {
        let k = connect_key(0, "172.17.0.1:40000".parse().unwrap(), "172.17.0.2:53".parse().unwrap());
        assert_eq!(k.client_addr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 172, 17, 0, 1]);
        assert_eq!(k.target_addr[10..], [0xff, 0xff, 172, 17, 0, 2]);
        assert_eq!((k.client_port, k.target_port, k._pad), (40000, 53, 0));
        let mapped = connect_key(
            0,
            "[::ffff:172.17.0.1]:40000".parse().unwrap(),
            "[::ffff:172.17.0.2]:53".parse().unwrap(),
        );
        assert_eq!(mapped, k);
        let v6 = connect_key(0, "[fd00::1]:40000".parse().unwrap(), "[fd00::2]:53".parse().unwrap());
        assert_eq!(v6.client_addr, "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_ne!(connect_key(0, "172.17.0.2:53".parse().unwrap(), "172.17.0.1:40000".parse().unwrap()), k);
    }
}
