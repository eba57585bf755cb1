//! What one pass (a batch of lines, a round of audits, a recheck of the loopback gauge) has
//! read of each namespace: its listeners, and who holds them. Reading listeners means joining
//! the namespace from a thread, and finding holders means walking /proc: each is done at most
//! once per namespace per pass, however many ports or lines the pass covers.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
};

use crate::{
    bounds,
    diagnose::{
        docker_dns,
        listeners::{self, Listener, Listening, Proto},
        procfs::{self, Holder},
        report::ListenerReport,
    },
    netns::Netns,
};

/// One pass's reads, by namespace inode and protocol. Drop it when the pass ends: the next one
/// reads afresh.
#[derive(Default)]
pub(crate) struct NamespaceReads {
    listening: HashMap<(u64, Proto), io::Result<Listening>>,
    holders: HashMap<(u64, Proto), BTreeMap<u64, Vec<Holder>>>,
    /// Addresses of one interface of a namespace, by (namespace inode, ifindex).
    addresses: HashMap<(u64, u32), Vec<IpAddr>>,
    /// Namespaces read in this pass (each at most once), for the audit's account of its work.
    reads: usize,
}

impl NamespaceReads {
    /// The namespace's `proto` listeners (with their V6ONLY flags), read on first use in this pass.
    pub(crate) fn listening(&mut self, ns: &Netns, proto: Proto) -> Result<&Listening, &io::Error> {
        self.listening
            .entry((ns.inode, proto))
            .or_insert_with(|| {
                self.reads += 1;
                listeners::listening_in(ns, proto)
            })
            .as_ref()
    }

    /// The addresses of interface `ifindex` of the namespace, read on first use in this pass;
    /// none when they cannot be read (the namespace is gone: its listeners fail too). For `lo`,
    /// only in scope where a forwarder dials the namespace's own address, the namespace's other
    /// addresses: those are what the refused SYNs were sent to.
    pub(crate) fn addresses(&mut self, ns: &Netns, ifindex: u32) -> &[IpAddr] {
        use crate::netns::prefixes;
        self.addresses.entry((ns.inode, ifindex)).or_insert_with(|| {
            let read = if ifindex == bindtrace_common::LOOPBACK_IFINDEX {
                ns.run(prefixes::global_addresses)
            } else {
                ns.run(|| prefixes::addresses_of_interface(ifindex))
            };
            read.unwrap_or_else(|e| {
                log::debug!("reading the addresses of interface {ifindex}: {e}");
                Vec::new()
            })
        })
    }

    /// How many namespaces this pass has read.
    pub(crate) fn reads(&self) -> usize {
        self.reads
    }

    /// The holders of every `proto` listener of the namespace, found in one walk of /proc.
    pub(crate) fn holders(&mut self, ns: &Netns, proto: Proto) -> &BTreeMap<u64, Vec<Holder>> {
        let key = (ns.inode, proto);
        if !self.holders.contains_key(&key) {
            let inodes: Vec<u64> = match self.listening(ns, proto) {
                Ok(found) => found.listeners.iter().map(|l| l.inode).collect(),
                Err(_) => Vec::new(),
            };
            self.holders.insert(key, procfs::holders(&inodes, ns.inode));
        }
        &self.holders[&key]
    }

    /// `listeners` (of `ns`) as reported, each with the processes holding it, within the
    /// bounds of [`bounds::LISTENERS`] and [`bounds::HOLDERS`]; and how many listeners were
    /// left out.
    pub(crate) fn reports(
        &mut self,
        ns: &Netns,
        proto: Proto,
        listeners: &[Listener],
    ) -> (Vec<ListenerReport>, usize) {
        if listeners.is_empty() {
            return (Vec::new(), 0);
        }
        let holders = self.holders(ns, proto);
        // Docker's embedded DNS is the daemon's, not something the container listens on.
        let listeners: Vec<&Listener> =
            listeners.iter().filter(|l| !docker_dns::is_daemon_resolver(l, holders.get(&l.inode))).collect();
        let shown = listeners.len().min(bounds::LISTENERS);
        let reports = listeners[..shown]
            .iter()
            .map(|l| {
                let (pids, pids_omitted) =
                    bounds::first(holders.get(&l.inode).cloned().unwrap_or_default(), bounds::HOLDERS);
                ListenerReport { ip: l.addr, port: l.port, pids, pids_omitted }
            })
            .collect();
        (reports, listeners.len() - shown)
    }
}
