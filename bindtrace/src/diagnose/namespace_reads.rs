//! What one pass (a batch of lines, a round of audits, a recheck of the loopback gauge) has
//! read of each namespace: its listeners, and who holds them. Reading listeners means joining
//! the namespace from a thread, and finding holders means walking /proc: each is done at most
//! once per namespace per pass, however many ports or lines the pass covers.
use std::{
    collections::{BTreeMap, HashMap},
    io,
};

use crate::{
    bounds,
    diagnose::{
        listeners::{self, Listener, Listening},
        procfs::{self, Holder},
        report::ListenerReport,
    },
    netns::Netns,
};

/// One pass's reads, by namespace inode. Drop it when the pass ends: the next one reads afresh.
#[derive(Default)]
pub(crate) struct NamespaceReads {
    listening: HashMap<u64, io::Result<Listening>>,
    holders: HashMap<u64, BTreeMap<u64, Vec<Holder>>>,
    /// Namespaces read in this pass (each at most once), for the audit's account of its work.
    reads: usize,
}

impl NamespaceReads {
    /// The namespace's listeners (with their V6ONLY flags), read on first use in this pass.
    pub(crate) fn listening(&mut self, ns: &Netns) -> Result<&Listening, &io::Error> {
        self.listening
            .entry(ns.inode)
            .or_insert_with(|| {
                self.reads += 1;
                listeners::listening_in(ns)
            })
            .as_ref()
    }

    /// How many namespaces this pass has read.
    pub(crate) fn reads(&self) -> usize {
        self.reads
    }

    /// The holders of every listener of the namespace, found in one walk of /proc.
    pub(crate) fn holders(&mut self, ns: &Netns) -> &BTreeMap<u64, Vec<Holder>> {
        if !self.holders.contains_key(&ns.inode) {
            let inodes: Vec<u64> = match self.listening(ns) {
                Ok(found) => found.listeners.iter().map(|l| l.inode).collect(),
                Err(_) => Vec::new(),
            };
            self.holders.insert(ns.inode, procfs::holders(&inodes, ns.inode));
        }
        &self.holders[&ns.inode]
    }

    /// `listeners` (of `ns`) as reported, each with the processes holding it, within the
    /// bounds of [`bounds::LISTENERS`] and [`bounds::HOLDERS`]; and how many listeners were
    /// left out.
    pub(crate) fn reports(&mut self, ns: &Netns, listeners: &[Listener]) -> (Vec<ListenerReport>, usize) {
        if listeners.is_empty() {
            return (Vec::new(), 0);
        }
        let holders = self.holders(ns);
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
