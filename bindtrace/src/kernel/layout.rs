//! The few kernel facts the eBPF programs need, read from the running kernel's BTF.
//!
//! Struct layouts and enum values move between kernel versions and configs (sk_buff changes
//! almost every release, the drop reasons are renumbered as reasons are added), so nothing
//! here is hard-coded: everything is resolved once at start and handed to the eBPF object as
//! globals.

use crate::kernel::btf::{BitField, Btf, BtfError};

/// Everything the kernel side needs from the running kernel's BTF, resolved once at start; the eBPF
/// object receives these as globals. Never hard-coded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelLayout {
    pub(crate) skb_dev: u32,
    pub(crate) skb_head: u32,
    pub(crate) skb_network_header: u32,
    pub(crate) skb_transport_header: u32,
    pub(crate) dev_ifindex: u32,
    /// net_device.nd_net.net (possible_net_t wraps the pointer)
    pub(crate) dev_nd_net: u32,
    /// struct net: net_cookie (u64)
    pub(crate) net_cookie: u32,
    /// struct net: ns.inum (u32)
    pub(crate) net_ns_inum: u32,
    /// `SK_RST_REASON_NO_SOCKET` when tcp:tcp_send_reset carries an `enum sk_rst_reason` argument (about 6.10+), else None.
    pub(crate) rst_reason_no_socket: Option<u32>,
    /// `SKB_DROP_REASON_NO_SOCKET` when skb:kfree_skb carries a drop reason (5.17+), else None.
    pub(crate) drop_reason_no_socket: Option<u32>,
    /// Offset of `recursion_misses` in the uapi `struct bpf_prog_info` (5.12+), else None: how
    /// often the kernel skipped our program because it was already running on that CPU.
    pub(crate) prog_info_recursion_misses: Option<u32>,
    /// `sk_buff.csum_complete_sw` and `sk_buff.csum_valid` (one bit each): how the UDP hook tells
    /// an IPv6 datagram with a bad checksum, which IPv6 frees with NO_SOCKET too.
    pub(crate) skb_csum_complete_sw: BitField,
    pub(crate) skb_csum_valid: BitField,
}

/// The eBPF side reads pointers as 8 bytes (bindtrace runs on 64-bit kernels only).
const PTR: u32 = 8;

impl KernelLayout {
    pub(crate) fn resolve(btf: &Btf) -> Result<KernelLayout, BtfError> {
        Ok(KernelLayout {
            skb_dev: btf.member_offset("sk_buff.dev", PTR)?,
            skb_head: btf.member_offset("sk_buff.head", PTR)?,
            skb_network_header: btf.member_offset("sk_buff.network_header", 2)?,
            skb_transport_header: btf.member_offset("sk_buff.transport_header", 2)?,
            dev_ifindex: btf.member_offset("net_device.ifindex", 4)?,
            dev_nd_net: btf.member_offset("net_device.nd_net.net", PTR)?,
            // atomic64_t before 5.12, u64 since: both 8 bytes, which is all the reader cares about.
            net_cookie: btf.member_offset("net.net_cookie", 8)?,
            net_ns_inum: btf.member_offset("net.ns.inum", 4)?,
            rst_reason_no_socket: reason(
                btf,
                "btf_trace_tcp_send_reset",
                "sk_rst_reason",
                "SK_RST_REASON_NO_SOCKET",
            )?,
            drop_reason_no_socket: reason(
                btf,
                "btf_trace_kfree_skb",
                "skb_drop_reason",
                "SKB_DROP_REASON_NO_SOCKET",
            )?,
            prog_info_recursion_misses: match btf.member("bpf_prog_info.recursion_misses") {
                Ok(m) if m.size == 8 => Some(m.offset),
                Ok(_) => None,
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e),
            },
            skb_csum_complete_sw: one_bit(btf, "sk_buff.csum_complete_sw")?,
            skb_csum_valid: one_bit(btf, "sk_buff.csum_valid")?,
        })
    }
}

/// A one-bit flag of a kernel struct; any other width would be read wrong in the kernel.
fn one_bit(btf: &Btf, path: &str) -> Result<BitField, BtfError> {
    let field = btf.bitfield(path)?;
    if field.bits != 1 {
        return Err(BtfError::WrongBits { path: path.to_owned(), bits: field.bits, expected: 1 });
    }
    Ok(field)
}

/// `enumerator` of `enum <enum_name>` if the tracepoint prototype behind `typedef`
/// (`btf_trace_<event>`) takes an argument of that enum type, else None. Decided from the
/// prototype rather than the version: distributions backport such arguments.
fn reason(btf: &Btf, typedef: &str, enum_name: &str, enumerator: &str) -> Result<Option<u32>, BtfError> {
    let params = match btf.func_proto_params(typedef) {
        Ok(params) => params,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let wanted = format!("enum {enum_name}");
    if !params.iter().any(|p| p.strip_prefix("const ").unwrap_or(p) == wanted) {
        return Ok(None);
    }
    let value = match btf.enum_value(enum_name, enumerator) {
        Ok(value) => value,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    u32::try_from(value).map(Some).map_err(|_| BtfError::EnumOutOfRange {
        enum_name: enum_name.to_owned(),
        enumerator: enumerator.to_owned(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::btf::tests::{V5_10, V6_1, V6_18, fixture};

    #[test]
    fn a_byte_sized_member_is_not_a_bitfield() {
        let e = fixture(V6_18).bitfield("sk_buff.dev").unwrap_err();
        assert_eq!(e.to_string(), "`sk_buff.dev` is not a bitfield of a kind_flag struct");
        let e = one_bit(fixture(V6_18), "sk_buff.pkt_type").unwrap_err();
        assert_eq!(e.to_string(), "`sk_buff.pkt_type` is 3 bits wide, expected 1");
    }

    #[test]
    fn layout_6_18() {
        // Offsets from pahole on the 6.18 kernel this fixture was taken from.
        let expected = KernelLayout {
            skb_dev: 16,
            skb_head: 192,
            skb_network_header: 180,
            skb_transport_header: 178,
            dev_ifindex: 224,
            dev_nd_net: 264,
            net_cookie: 4160,
            net_ns_inum: 176,
            rst_reason_no_socket: Some(1),
            drop_reason_no_socket: Some(3),
            prog_info_recursion_misses: Some(208),
            skb_csum_complete_sw: BitField { byte: 129, bit: 5, bits: 1 },
            skb_csum_valid: BitField { byte: 130, bit: 6, bits: 1 },
        };
        assert_eq!(KernelLayout::resolve(fixture(V6_18)).unwrap(), expected);
    }

    #[test]
    fn layout_6_1() {
        // No reason argument on tcp_send_reset yet; drop reasons exist but are numbered
        // differently; sk_buff, net_device and ns_common all differ from 6.18 (pahole agrees).
        let expected = KernelLayout {
            skb_dev: 16,
            skb_head: 200,
            skb_network_header: 184,
            skb_transport_header: 182,
            dev_ifindex: 216,
            dev_nd_net: 1280,
            net_cookie: 4096,
            net_ns_inum: 144,
            rst_reason_no_socket: None,
            drop_reason_no_socket: Some(2),
            prog_info_recursion_misses: Some(208),
            skb_csum_complete_sw: BitField { byte: 130, bit: 1, bits: 1 },
            skb_csum_valid: BitField { byte: 129, bit: 7, bits: 1 },
        };
        assert_eq!(KernelLayout::resolve(fixture(V6_1)).unwrap(), expected);
    }

    #[test]
    fn layout_5_10() {
        let expected = KernelLayout {
            skb_dev: 16,
            skb_head: 192,
            skb_network_header: 180,
            skb_transport_header: 178,
            dev_ifindex: 256,
            dev_nd_net: 1264,
            net_cookie: 4480,
            net_ns_inum: 144,
            rst_reason_no_socket: None,
            drop_reason_no_socket: None,
            prog_info_recursion_misses: None,
            skb_csum_complete_sw: BitField { byte: 130, bit: 1, bits: 1 },
            skb_csum_valid: BitField { byte: 129, bit: 7, bits: 1 },
        };
        assert_eq!(KernelLayout::resolve(fixture(V5_10)).unwrap(), expected);
    }

    #[test]
    fn reason_comes_from_the_prototype() {
        let btf = fixture(V6_18);
        // The enum exists on 6.18, but kfree_skb does not take it: no reason.
        let rst = ("sk_rst_reason", "SK_RST_REASON_NO_SOCKET");
        assert_eq!(reason(btf, "btf_trace_kfree_skb", rst.0, rst.1).unwrap(), None);
        assert_eq!(reason(btf, "btf_trace_tcp_send_reset", rst.0, rst.1).unwrap(), Some(1));
        assert_eq!(reason(btf, "btf_trace_tcp_send_reset", rst.0, "NOPE").unwrap(), None);
        assert_eq!(reason(btf, "btf_trace_no_such_event", rst.0, rst.1).unwrap(), None);
    }

    #[test]
    fn wrong_size_is_an_error() {
        let e = fixture(V6_18).member_offset("sk_buff.dev", 4).unwrap_err();
        assert_eq!(e.to_string(), "`sk_buff.dev` is 8 bytes, expected 4");
    }

    #[test]
    fn running_kernel() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            println!("skipped: /sys/kernel/btf/vmlinux does not exist on this machine");
            return;
        }
        let btf = Btf::from_sys_fs().unwrap();
        let layout = KernelLayout::resolve(&btf).unwrap();
        println!("running kernel: {layout:?}");
        assert!(layout.skb_dev < layout.skb_head);
    }
}
