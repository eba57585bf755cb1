//! Loads the embedded eBPF object with this kernel's offsets and attaches one hook.
//!
//! Everything loaded is owned by [`Loaded`]: dropping it (on SIGINT, SIGTERM, an error, a
//! panic) closes the program, link and map descriptors, which detaches everything. The tc hook
//! is loaded here but attached per port ([`Loaded::sync_tc`]); its links are dropped first.
use std::collections::BTreeMap;

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, SchedClassifier},
};
use bindtrace_common::{BridgeId, CountKey, STAT_COUNT_OVERFLOW, STAT_RINGBUF_LOST, ScopeKey};

use crate::{
    kernel::counts::Counts,
    kernel::hook::Hook,
    kernel::layout::KernelLayout,
    kernel::tc::{AttachError, AttachMode, TcPorts},
    kernel::tc_instance::{self, Instance, InstanceError},
    netns::scope::Port,
};

/// Every tp_btf this module may load: either hook's, and kfree_skb for UDP next to
/// tcp_send_reset (see `attach_udp`).
pub(crate) const TRACEPOINTS: [&str; 2] = ["tcp_send_reset", "kfree_skb"];

/// The object `build.rs` built; empty when the build skipped eBPF.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bindtrace"));

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error(
        "this bindtrace binary was built with BINDTRACE_SKIP_EBPF=1 and carries no eBPF programs; \
         rebuild it after `sudo ./x setup`"
    )]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program or map `{0}` (build mismatch)")]
    Missing(&'static str),
    #[error("attaching {what} failed: {source}")]
    Attach { what: String, source: aya::programs::ProgramError },
    #[error("opening map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error(transparent)]
    TcInstance(InstanceError),
}

/// Knobs the kernel side takes as globals.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub(crate) ringbuf_bytes: u32,
    /// Keys each of the two count maps holds (`--counts-size`).
    pub(crate) counts_size: u32,
    /// Ports (namespace, interface) the SCOPE and TC_PORTS maps hold (`--scope-size`).
    pub(crate) scope_size: u32,
    pub(crate) fold_window_ns: u64,
    /// aya-log level for kernel-side messages (0 = off).
    pub(crate) kernel_log_level: u8,
    /// Further u32 globals by name (the connect tracker's offsets, `sock_layout.rs`).
    pub(crate) globals: Vec<(&'static str, u32)>,
    /// How the tc hook attaches (only used with [`Hook::Tc`]).
    pub(crate) tc_mode: AttachMode,
}

pub(crate) struct Loaded {
    /// The tc hook's per-port links (None for the tracepoint hooks). Declared first so that it is
    /// dropped first: ports are detached before the program goes.
    pub(crate) tc: Option<TcPorts>,
    /// Holds the programs, the link and the aya-log buffer: dropped last.
    pub(crate) ebpf: Ebpf,
    pub(crate) scope: HashMap<MapData, ScopeKey, BridgeId>,
    pub(crate) counts: Counts,
    /// When each key that found the count map full last sent a sample (an LRU map): read when
    /// samples were lost, so that such a key still gets its line.
    pub(crate) overflow_samples: HashMap<MapData, CountKey, u64>,
    pub(crate) stats: PerCpuArray<MapData, u64>,
    pub(crate) events: Option<RingBuf<MapData>>,
    pub(crate) hook: Hook,
    /// Whether UDP refusals are counted, and if not why (for the start-up message).
    pub(crate) udp: UdpCounting,
    /// Where `recursion_misses` sits in `bpf_prog_info` on this kernel, if it has it.
    recursion_misses_offset: Option<u32>,
}

/// `EbpfLoader::new()` in a mount namespace of this thread alone, where /sys/kernel/btf is an
/// empty tmpfs (see [`Loaded::loader`]). The namespace ends with the thread.
fn loader_without_kernel_btf() -> std::io::Result<EbpfLoader<'static>> {
    let check = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
    // SAFETY: unshare and mount take no pointers but the NUL-terminated literals, and change
    // only this thread's view of the mounts (CLONE_NEWNS unshares the thread's fs too).
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Private first: in a namespace that still shares propagation with the host's, the
        // tmpfs below would appear over the host's /sys/kernel/btf too.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"none".as_ptr(),
            c"/sys/kernel/btf".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ))?;
    }
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    Ok(loader)
}

/// Fails at once when this binary was built without its eBPF object.
pub(crate) fn check_object() -> Result<(), LoadError> {
    if OBJECT.is_empty() { Err(LoadError::NoObject) } else { Ok(()) }
}

impl Loaded {
    /// A loader that holds no BTF. aya 0.14's `EbpfLoader::new()` always parses
    /// /sys/kernel/btf/vmlinux in full (~16 MB of heap on 6.18's 5.5 MB BTF, which made the
    /// process's peak RSS) and has no constructor without that; `.btf(None)` only drops it
    /// afterwards. The parse is not needed: our object has no CO-RE relocations (the kernel's
    /// layout comes in through globals), and the program loads get the small BTF of
    /// [`crate::kernel::btf::ProgramTypes::aya_btf`]. So the loader is made on a short-lived thread
    /// whose own mount namespace hides /sys/kernel/btf under an empty tmpfs: aya's read fails at
    /// once and aya ignores the error. Where that namespace cannot be made (no CAP_SYS_ADMIN in
    /// it, an LSM refusing the mount), the loader parses and drops as before.
    pub(crate) fn loader() -> EbpfLoader<'static> {
        let hidden = std::thread::Builder::new()
            .name("btf-less loader".into())
            .spawn(loader_without_kernel_btf)
            .map_err(|e| e.to_string())
            .and_then(|t| t.join().map_err(|_| "the thread panicked".to_owned()))
            .and_then(|made| made.map_err(|e| e.to_string()));
        match hidden {
            Ok(loader) => loader,
            Err(e) => {
                log::debug!("aya's loader parses the kernel BTF once and drops it (cannot hide it: {e})");
                let mut loader = EbpfLoader::new();
                loader.btf(None);
                loader
            }
        }
    }

    /// `loader` comes from [`Loaded::loader`].
    pub(crate) fn load(
        loader: EbpfLoader<'static>,
        layout: &KernelLayout,
        hook: Hook,
        btf: &Btf,
        opts: &LoadOptions,
    ) -> Result<Loaded, LoadError> {
        check_object()?;
        // Narrowed to this call: it borrows the globals below.
        let mut loader: EbpfLoader<'_> = loader;
        // `must_exist` everywhere: a global the object lacks means the object and loader disagree.
        loader
            .override_global("OFF_SKB_DEV", &layout.skb_dev, true)
            .override_global("OFF_SKB_HEAD", &layout.skb_head, true)
            .override_global("OFF_SKB_NETWORK_HEADER", &layout.skb_network_header, true)
            .override_global("OFF_SKB_TRANSPORT_HEADER", &layout.skb_transport_header, true)
            .override_global("OFF_DEV_IFINDEX", &layout.dev_ifindex, true)
            .override_global("OFF_DEV_ND_NET", &layout.dev_nd_net, true)
            .override_global("OFF_NET_COOKIE", &layout.net_cookie, true)
            .override_global("OFF_NET_NS_INUM", &layout.net_ns_inum, true)
            .override_global("FOLD_WINDOW_NS", &opts.fold_window_ns, true)
            .override_global(aya_log::LEVEL, &opts.kernel_log_level, false)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .map_max_entries("COUNTS_A", opts.counts_size)
            .map_max_entries("COUNTS_B", opts.counts_size)
            .map_max_entries("SCOPE", opts.scope_size)
            .map_max_entries("TC_PORTS", opts.scope_size);
        // The reason values this kernel uses; u32::MAX (never a reason) for the hook not attached.
        let rst = layout.rst_reason_no_socket.unwrap_or(u32::MAX);
        let drop = layout.drop_reason_no_socket.unwrap_or(u32::MAX);
        loader.override_global("RST_REASON_NO_SOCKET", &rst, true).override_global(
            "DROP_REASON_NO_SOCKET",
            &drop,
            true,
        );
        // The UDP side's checksum bits (see `checksum_failed` in the eBPF crate).
        let csum_sw = &layout.skb_csum_complete_sw;
        let csum_valid = &layout.skb_csum_valid;
        let (sw_byte, sw_bit) = (csum_sw.byte, u32::from(csum_sw.bit));
        let (valid_byte, valid_bit) = (csum_valid.byte, u32::from(csum_valid.bit));
        loader
            .override_global("OFF_SKB_CSUM_COMPLETE_SW", &sw_byte, true)
            .override_global("BIT_SKB_CSUM_COMPLETE_SW", &sw_bit, true)
            .override_global("OFF_SKB_CSUM_VALID", &valid_byte, true)
            .override_global("BIT_SKB_CSUM_VALID", &valid_bit, true);
        // kfree_skb counts TCP too only when it is the TCP hook; next to tcp_send_reset it
        // counts UDP alone, so no SYN is counted twice.
        let kfree_tcp: u8 = u8::from(hook == Hook::KfreeSkb);
        loader.override_global("KFREE_SKB_TCP", &kfree_tcp, true);
        for (name, value) in &opts.globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(LoadError::Load)?;

        let tc = attach_hook(&mut ebpf, hook, btf, opts.tc_mode)?;
        let udp = attach_udp(&mut ebpf, hook, layout, btf);

        let scope = take(&mut ebpf, "SCOPE")
            .and_then(|m| HashMap::try_from(m).map_err(|source| LoadError::Map { name: "SCOPE", source }))?;
        let count_map = |ebpf: &mut Ebpf, name: &'static str| {
            take(ebpf, name)
                .and_then(|m| PerCpuHashMap::try_from(m).map_err(|source| LoadError::Map { name, source }))
        };
        let (a, b) = (count_map(&mut ebpf, "COUNTS_A")?, count_map(&mut ebpf, "COUNTS_B")?);
        let generation = take(&mut ebpf, "GENERATION").and_then(|m| {
            Array::try_from(m).map_err(|source| LoadError::Map { name: "GENERATION", source })
        })?;
        let counts =
            Counts::new(a, b, generation).map_err(|source| LoadError::Map { name: "GENERATION", source })?;
        let overflow_samples = take(&mut ebpf, "OVERFLOW_SAMPLES").and_then(|m| {
            HashMap::try_from(m).map_err(|source| LoadError::Map { name: "OVERFLOW_SAMPLES", source })
        })?;
        let stats = take(&mut ebpf, "STATS").and_then(|m| {
            PerCpuArray::try_from(m).map_err(|source| LoadError::Map { name: "STATS", source })
        })?;
        let events = take(&mut ebpf, "EVENTS")
            .and_then(|m| RingBuf::try_from(m).map_err(|source| LoadError::Map { name: "EVENTS", source }))?;
        Ok(Loaded {
            tc,
            ebpf,
            scope,
            counts,
            overflow_samples,
            stats,
            events: Some(events),
            hook,
            udp,
            recursion_misses_offset: layout.prog_info_recursion_misses,
        })
    }

    /// Attaches the tc hook to the ports that joined and detaches it from those that left (a
    /// no-op for the tracepoint hooks). Returns the ports it could not attach to (tried again
    /// at the next sync) and how many it is attached to.
    pub(crate) fn sync_tc(&mut self, ports: &BTreeMap<ScopeKey, Port>) -> (Vec<AttachError>, usize) {
        let Some(tc) = self.tc.as_mut() else { return (Vec::new(), 0) };
        let failed = tc.sync(&mut self.ebpf, ports);
        (failed, tc.attached())
    }

    /// Kernel-side counters summed over CPUs: (ring-buffer reservations that failed, refusals
    /// counted in the overflow slot because the active count map was full).
    pub(crate) fn stats(&self) -> (u64, u64) {
        let sum = |slot: u32| self.stats.get(&slot, 0).map(|v| v.iter().copied().sum::<u64>()).unwrap_or(0);
        (sum(STAT_RINGBUF_LOST), sum(STAT_COUNT_OVERFLOW))
    }

    /// Times the kernel skipped a refusal program because it was already running on that CPU
    /// (None where the kernel does not say), summed over the hook and the UDP program next to
    /// it. A refusal among them went uncounted.
    pub(crate) fn recursion_misses(&self) -> Option<u64> {
        use std::os::fd::AsFd as _;
        let offset = self.recursion_misses_offset?;
        let misses = |name: &str| -> Option<u64> {
            let fd = self.ebpf.program(name)?.fd().ok()?;
            crate::kernel::prog_info::recursion_misses(fd.as_fd(), offset).ok()
        };
        let mut total = misses(self.hook.program())?;
        if self.udp == UdpCounting::SecondProgram {
            total += misses(UDP_PROGRAM)?;
        }
        Some(total)
    }
}

/// How UDP datagrams to a port without a socket are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UdpCounting {
    /// By the hook itself (`kfree-skb` sees both).
    SameProgram,
    /// By a second program on `kfree_skb`, next to `tcp-send-reset`.
    SecondProgram,
    /// By the tc classifier, from the ICMP port unreachables leaving the containers: the kernel
    /// rate-limits those, so the counts are lower bounds.
    TcReplies,
    /// Not at all, and why (the remedy is in the text).
    NotCounted(String),
}

impl UdpCounting {
    /// The start-up line about UDP.
    pub(crate) fn describe(&self) -> String {
        match self {
            UdpCounting::SameProgram => "UDP: counted on kfree_skb (drop reason NO_SOCKET)".into(),
            UdpCounting::SecondProgram => {
                "UDP: counted by a second program on kfree_skb (drop reason NO_SOCKET)".into()
            }
            UdpCounting::TcReplies => "UDP: counted on the tc hook from the ICMP port unreachables leaving \
                 the containers, which the kernel rate-limits: UDP counts are lower bounds (\"at least N\"); \
                 --hook auto or kfree-skb counts every datagram on Linux 5.17 or later"
                .into(),
            UdpCounting::NotCounted(why) => format!("UDP refusals are NOT counted: {why}"),
        }
    }
}

/// The program that counts UDP next to `tcp-send-reset`.
const UDP_PROGRAM: &str = "bt_kfree_skb";

/// Where the hook does not see UDP itself, attaches `bt_kfree_skb` for UDP too (it counts UDP
/// only there). A failure is not fatal: TCP still works, and the start-up message says UDP is
/// not counted and why.
fn attach_udp(ebpf: &mut Ebpf, hook: Hook, layout: &KernelLayout, btf: &Btf) -> UdpCounting {
    match hook {
        Hook::KfreeSkb => return UdpCounting::SameProgram,
        // The classifier itself reads the port unreachables (bindtrace-ebpf/src/probes/tc.rs).
        Hook::Tc => return UdpCounting::TcReplies,
        Hook::TcpSendReset => {}
    }
    if layout.drop_reason_no_socket.is_none() {
        return UdpCounting::NotCounted("this kernel's kfree_skb carries no drop reason".into());
    }
    let result = (|| -> Result<(), String> {
        let program: &mut BtfTracePoint = ebpf
            .program_mut(UDP_PROGRAM)
            .ok_or("the eBPF object has no kfree_skb program (build mismatch)")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        program.load("kfree_skb", btf).map_err(|e| format!("loading tp_btf/kfree_skb: {e}"))?;
        program.attach().map_err(|e| format!("attaching tp_btf/kfree_skb: {e}"))?;
        Ok(())
    })();
    match result {
        Ok(()) => UdpCounting::SecondProgram,
        Err(e) => UdpCounting::NotCounted(format!("{e}; TCP is still counted")),
    }
}

/// This instance's slot, and what killed instances left on this namespace's interfaces
/// removed, before anything of ours is attached.
fn clsact_instance(program: &str) -> Result<Instance, LoadError> {
    let dir = std::path::Path::new(tc_instance::LOCK_DIR);
    let instance = Instance::acquire(dir).map_err(LoadError::TcInstance)?;
    match instance.remove_dead_filters(program) {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => {
            let mut ifaces: Vec<&str> = removed.iter().map(|r| r.ifname.as_str()).collect();
            ifaces.dedup();
            log::info!(
                "tc: removed {} clsact filters that a killed bindtrace left (on {})",
                removed.len(),
                ifaces.join(", ")
            );
        }
        // Not fatal: our own filters work; the dead ones keep counting nowhere.
        Err(e) => log::warn!("tc: looking for filters a killed bindtrace left: {e} (they stay)"),
    }
    log::debug!("tc: instance slot {} (filter priority {})", instance.slot(), instance.priority());
    Ok(instance)
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::Missing(name))
}

/// Loads the hook's program and attaches it: a tracepoint at once; a classifier is only loaded
/// (the verifier speaks before anything is attached) and attached per port by [`TcPorts`].
fn attach_hook(
    ebpf: &mut Ebpf,
    hook: Hook,
    btf: &Btf,
    tc_mode: AttachMode,
) -> Result<Option<TcPorts>, LoadError> {
    let program = ebpf.program_mut(hook.program()).ok_or(LoadError::Missing("hook program"))?;
    let tc = match hook.tracepoint() {
        Some(tracepoint) => {
            let program: &mut BtfTracePoint = program
                .try_into()
                .map_err(|source| LoadError::Attach { what: hook.program().into(), source })?;
            let what = || format!("tp_btf/{tracepoint} ({})", hook.program());
            program.load(tracepoint, btf).map_err(|source| LoadError::Attach { what: what(), source })?;
            program.attach().map_err(|source| LoadError::Attach { what: what(), source })?;
            None
        }
        None => {
            // Loaded now (the verifier speaks before anything is attached), attached per port.
            let program: &mut SchedClassifier = program
                .try_into()
                .map_err(|source| LoadError::Attach { what: hook.program().into(), source })?;
            program.load().map_err(|source| LoadError::Attach {
                what: format!("classifier {}", hook.program()),
                source,
            })?;
            let ports = take(ebpf, "TC_PORTS").and_then(|m| {
                HashMap::try_from(m).map_err(|source| LoadError::Map { name: "TC_PORTS", source })
            })?;
            let instance = match tc_mode {
                AttachMode::Tcx => None,
                AttachMode::Clsact => Some(clsact_instance(hook.program())?),
            };
            Some(TcPorts::new(tc_mode, hook.program(), ports, instance))
        }
    };
    Ok(tc)
}
