//! The listening sockets in `/proc/net/{tcp,udp}{,6}`: the fallback where sock_diag
//! is unavailable. Slower (each read walks the established hash) and without IPV6_V6ONLY.
//! Parsed by hand: four columns of a fixed kernel text format, not worth the procfs crate.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Listener, Proto};

/// `TCP_LISTEN` in /proc/net/tcp's `st` column.
const TCP_LISTEN: u8 = 0x0A;
/// `TCP_CLOSE` in /proc/net/udp's: a bound socket that is not connected.
const TCP_CLOSE: u8 = 0x07;

/// Parses `/proc/net/tcp` or `/proc/net/tcp6` and keeps the listening sockets.
pub(crate) fn parse_tcp(text: &str) -> Vec<Listener> {
    parse(Proto::Tcp, text)
}

/// Parses a table of `proto` and keeps its listeners: TCP sockets in LISTEN, UDP sockets that are
/// bound and not connected.
pub(crate) fn parse(proto: Proto, text: &str) -> Vec<Listener> {
    text.lines().skip(1).filter_map(|l| parse_line(proto, l)).collect()
}

fn parse_line(proto: Proto, line: &str) -> Option<Listener> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    // (the same columns for udp, whose table adds ref, pointer and drops after them)
    let fields: Vec<&str> = line.split_whitespace().collect();
    let wanted = match proto {
        Proto::Tcp => TCP_LISTEN,
        Proto::Udp => TCP_CLOSE,
    };
    if fields.len() < 10 || u8::from_str_radix(fields[3], 16).ok()? != wanted {
        return None;
    }
    let (addr_hex, port_hex) = fields[1].split_once(':')?;
    Some(Listener {
        addr: parse_hex_addr(addr_hex)?,
        port: u16::from_str_radix(port_hex, 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// The kernel prints addresses as native-endian 32-bit words in hex (`%08X` per word).
fn parse_hex_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 00000000:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0
   2: 020011AC:1F40 010011AC:B8E6 01 00000000:00000000 00:00000000 00000000     0        0 12347 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 223 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_ipv4_listeners_and_skips_other_states() {
        let l = parse_tcp(TCP);
        assert_eq!(
            l,
            vec![
                Listener { addr: "127.0.0.1".parse().unwrap(), port: 8000, inode: 12345 },
                Listener { addr: "0.0.0.0".parse().unwrap(), port: 3000, inode: 12346 },
            ]
        );
    }

    #[test]
    fn parses_ipv6_and_mapped_listeners() {
        let l = parse_tcp(TCP6);
        assert_eq!(l[0].addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(l[0].port, 8000);
        assert_eq!(l[1].addr, "::ffff:127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(l[1].port, 80);
    }

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1131: 0100007F:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5001 2 0000000000000000 0
 1132: 020011AC:8D2A 010011AC:0035 01 00000000:00000000 00:00000000 00000000     0        0 5002 2 0000000000000000 0
";

    #[test]
    fn udp_keeps_bound_unconnected_sockets_only() {
        assert_eq!(
            parse(Proto::Udp, UDP),
            vec![Listener { addr: "127.0.0.1".parse().unwrap(), port: 5353, inode: 5001 }]
        );
        // A TCP LISTEN line is not a UDP listener, nor a UDP line a TCP one.
        assert!(parse(Proto::Udp, TCP).is_empty());
        assert!(parse(Proto::Tcp, UDP).is_empty());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse_tcp("header\n garbage\n 0: zz:zz 0 0A\n").is_empty());
    }
}
