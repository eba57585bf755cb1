//! What one pass (a batch of lines, a round of audits, a recheck of the loopback gauge) has
//! read of each namespace: its listeners, and who holds them. Reading listeners means joining
//! the namespace from a thread, and finding holders means walking /proc: each is done at most
//! once per namespace per pass, however many ports or lines the pass covers.
use std::{
    collections::{BTreeMap, HashMap},
    io,
};

use crate::{
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
}

impl NamespaceReads {
    /// The namespace's listeners (with their V6ONLY flags), read on first use in this pass.
    pub(crate) fn listening(&mut self, ns: &Netns) -> Result<&Listening, &io::Error> {
        self.listening.entry(ns.inode).or_insert_with(|| listeners::listening_in(ns)).as_ref()
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

    /// `listeners` (of `ns`) as reported, each with the processes holding it.
    pub(crate) fn reports(&mut self, ns: &Netns, listeners: &[Listener]) -> Vec<ListenerReport> {
        if listeners.is_empty() {
            return Vec::new();
        }
        let holders = self.holders(ns);
        listeners
            .iter()
            .map(|l| ListenerReport {
                ip: l.addr,
                port: l.port,
                pids: holders.get(&l.inode).cloned().unwrap_or_default(),
            })
            .collect()
    }
}
