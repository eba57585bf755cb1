//! Userspace side of the connect tracker (`bindtrace-ebpf/src/connect.rs`): which prefixes to
//! watch, and who connected with a given 4-tuple to a given namespace.
use std::{collections::BTreeSet, net::SocketAddr};

use aya::{
    Ebpf,
    maps::{
        HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::BtfTracePoint,
};
use bindtrace_common::{Addr16, ConnectKey, Connector};

use crate::netns::prefixes::{Prefix, addr16, show_prefix};

const PROGRAM: &str = "bt_sock_set_state";
const TRACEPOINT: &str = "inet_sock_set_state";

/// Who made a connection, as the kernel recorded it when the socket entered SYN_SENT.
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
}

impl ConnectTracker {
    /// Loads and attaches `tp_btf/inet_sock_set_state` from the already loaded object (whose
    /// globals were set from [`crate::kernel::sock_layout::SockLayout`]) and takes its maps.
    pub(crate) fn attach(ebpf: &mut Ebpf, btf: &aya::Btf) -> anyhow::Result<ConnectTracker> {
        use anyhow::Context as _;
        let program: &mut BtfTracePoint = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("the eBPF object has no program {PROGRAM}"))?
            .try_into()?;
        program.load(TRACEPOINT, btf).with_context(|| format!("loading tp_btf/{TRACEPOINT}"))?;
        program.attach().with_context(|| format!("attaching tp_btf/{TRACEPOINT}"))?;
        let dests = ebpf.take_map("CONNECT_DESTS").context("no map CONNECT_DESTS")?;
        let connectors = ebpf.take_map("CONNECTORS").context("no map CONNECTORS")?;
        Ok(ConnectTracker {
            dests: LpmTrie::try_from(dests)?,
            connectors: HashMap::try_from(connectors)?,
            installed: BTreeSet::new(),
        })
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
        let key = ConnectKey {
            refused_netns_cookie: refused_netns,
            client_addr: addr16(client.ip()),
            target_addr: addr16(target.ip()),
            client_port: client.port(),
            target_port: target.port(),
            _pad: 0,
        };
        self.connectors.get(&key, 0).ok().map(ConnectorInfo::from)
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
}
