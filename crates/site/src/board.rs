//! What each site of a group has durably received, as this site knows it: at a primary,
//! from the secondaries' acknowledgements (sent on in `peers` frames); at a secondary,
//! from those frames. A secondary's standby SLINKs keep in its log only what their sites
//! lack (see `dmrep_targets::replicator::group::machine::roles`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

/// One group's positions: site name -> highest history seq it has durably received.
#[derive(Default)]
pub struct Board {
    positions: Mutex<BTreeMap<String, u64>>,
}

impl Board {
    /// `site` has received through `h` (positions never go back).
    pub fn set(&self, site: &str, h: u64) {
        let mut p = self.positions.lock();
        let e = p.entry(site.to_string()).or_insert(h);
        *e = (*e).max(h);
    }

    /// Forget `site`'s position (its history was replaced: it may go back).
    pub fn forget(&self, site: &str) {
        self.positions.lock().remove(site);
    }

    /// Every known position but `except`'s.
    pub fn others(&self, except: &str) -> Vec<(String, u64)> {
        self.positions.lock().iter().filter(|(s, _)| s.as_str() != except).map(|(s, h)| (s.clone(), *h)).collect()
    }
}

/// The boards of every group of this daemon, by group name.
#[derive(Default)]
pub struct Boards(Mutex<HashMap<String, Arc<Board>>>);

impl Boards {
    pub fn of(&self, group: &str) -> Arc<Board> {
        self.0.lock().entry(group.to_string()).or_default().clone()
    }
}
