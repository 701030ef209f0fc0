//! End-to-end encrypted conversations, as the server sees them: the public state of each
//! group (see `conclave_e2ee::ds`), one lock per conversation so that commits are validated
//! and ordered one at a time (exactly one commit per epoch), and the removals (kicks, bans,
//! parts) that are pending until a member commits them.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use conclave_e2ee::ds::{GroupState, ServerSigner};

use crate::store::{GroupRow, Groups, StoreError};

/// One conversation's group.
pub struct ConvGroup {
    pub conv: String,
    pub state: GroupState,
    /// Sequence number of the last commit applied to `state`.
    pub applied_seq: u64,
    /// The group's epoch (kept, so checking a message does not decode the group).
    pub epoch: u64,
    /// The GroupInfo of the current epoch (for external joins).
    pub group_info: Vec<u8>,
    /// Application messages from epochs before this one are refused: the epoch made by the
    /// last commit that added or removed a device. So a message stored after a device joined
    /// is always readable by it, and one stored after a device left never is (see
    /// ARCHITECTURE.md, "Who reads what in an end-to-end conversation").
    pub membership_epoch: u64,
    /// Users removed on the server whose leaves are still in the group, and devices removed
    /// from their account (`user/device`) whose leaves are.
    pub pending: BTreeSet<String>,
}

impl ConvGroup {
    pub fn row(&self) -> Result<GroupRow, String> {
        Ok(GroupRow {
            conv: self.conv.clone(),
            group_id: self.state.group_id().to_vec(),
            state: self.state.to_bytes().map_err(|e| e.to_string())?,
            applied_seq: self.applied_seq,
            group_info: self.group_info.clone(),
            removal_epoch: self.membership_epoch,
            pending: self.pending.iter().cloned().collect(),
        })
    }
}

pub type GroupHandle = Arc<tokio::sync::Mutex<ConvGroup>>;

/// What the store holds of a group past what a node has applied (cluster mode: another node
/// ordered commits): the stored row when it is newer, and the commits after it in the log.
pub struct Newer {
    row: Option<GroupRow>,
    commits: Vec<(u64, String, Vec<u8>)>,
}

impl Newer {
    /// Reads, on the store thread, what is newer than `applied` for `conv`.
    pub fn read(db: &mut dyn Groups, conv: &str, applied: u64) -> Result<Newer, StoreError> {
        // The state is read (and opened) only when another node saved a newer one.
        let row = match db.e2ee_group_seq(conv)? {
            Some(seq) if seq > applied => db.e2ee_group(conv)?.filter(|r| r.applied_seq > applied),
            _ => None,
        };
        let from = row.as_ref().map_or(applied, |r| r.applied_seq);
        let commits = db.e2ee_commits_after(conv, from, conclave_e2ee::CT_COMMIT)?;
        Ok(Newer { row, commits })
    }

    pub fn is_empty(&self) -> bool {
        self.row.is_none() && self.commits.is_empty()
    }
}

impl ConvGroup {
    /// A stored group as it was saved (not yet brought up to its log).
    pub fn from_row(row: GroupRow) -> Result<ConvGroup, String> {
        let state = GroupState::from_bytes(&row.group_id, &row.state)
            .map_err(|e| format!("group of {}: {e}", row.conv))?;
        // The epoch is kept beside the state (checking a message must not decode the
        // group): read it once here, or every message after a restart would be refused as
        // stale until the next commit.
        let epoch = state
            .epoch()
            .map_err(|e| format!("group of {}: {e}", row.conv))?;
        Ok(ConvGroup {
            state,
            conv: row.conv,
            applied_seq: row.applied_seq,
            epoch,
            group_info: row.group_info,
            membership_epoch: row.removal_epoch,
            pending: row.pending.into_iter().collect(),
        })
    }

    /// A stored group brought up to its log: commits stored after the state was last saved
    /// (a crash between the two) are applied again, and the state saved.
    pub fn from_store(db: &mut dyn Groups, row: GroupRow) -> Result<ConvGroup, String> {
        let mut g = ConvGroup::from_row(row)?;
        let missed = db
            .e2ee_commits_after(&g.conv, g.applied_seq, conclave_e2ee::CT_COMMIT)
            .map_err(|e| e.to_string())?;
        if !missed.is_empty() {
            g.apply_commits(missed)?;
            let row = g.row()?;
            db.e2ee_put_group(&row)
                .map_err(|e: StoreError| e.to_string())?;
            tracing::info!(conv = %g.conv, "end-to-end group brought up to its log");
        }
        Ok(g)
    }

    /// Takes what another node ordered (see [`Newer`]); true when anything changed.
    pub fn catch_up(&mut self, newer: Newer) -> Result<bool, String> {
        if newer.is_empty() {
            return Ok(false);
        }
        if let Some(row) = newer.row {
            *self = ConvGroup::from_row(row)?;
        }
        self.apply_commits(newer.commits)?;
        Ok(true)
    }

    /// Applies stored commits in order (each was validated before it was stored; one that
    /// no longer applies is logged and skipped, as at start).
    fn apply_commits(&mut self, commits: Vec<(u64, String, Vec<u8>)>) -> Result<(), String> {
        for (seq, from, bytes) in commits {
            match self.state.validate_commit(&bytes, &from) {
                Ok(v) => {
                    let change = v.change.clone();
                    self.state = v.into_state();
                    self.applied_seq = seq;
                    if !change.added.is_empty() || !change.removed.is_empty() {
                        self.membership_epoch = change.epoch;
                    }
                }
                Err(e) => {
                    tracing::error!(conv = %self.conv, seq, error = %e, "stored commit does not apply");
                }
            }
        }
        self.epoch = self
            .state
            .epoch()
            .map_err(|e| format!("group of {}: {e}", self.conv))?;
        Ok(())
    }
}

/// Every end-to-end encrypted conversation, and the server's signature key.
pub struct E2ee {
    pub signer: ServerSigner,
    groups: Mutex<HashMap<String, GroupHandle>>,
}

impl E2ee {
    /// Loads the signature key and every group, bringing each up to its log: commits stored
    /// after the state was last saved (a crash between the two) are applied again.
    pub fn load(db: &mut dyn Groups) -> Result<E2ee, String> {
        let bytes = db
            .e2ee_signer(&mut || {
                ServerSigner::generate()
                    .map(|s| s.to_bytes())
                    .unwrap_or_default()
            })
            .map_err(|e| e.to_string())?;
        let signer = ServerSigner::from_bytes(&bytes).map_err(|e| e.to_string())?;
        let mut groups = HashMap::new();
        for row in db.e2ee_groups().map_err(|e| e.to_string())? {
            let g = ConvGroup::from_store(db, row)?;
            groups.insert(g.conv.clone(), Arc::new(tokio::sync::Mutex::new(g)));
        }
        Ok(E2ee {
            signer,
            groups: Mutex::new(groups),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, GroupHandle>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, conv: &str) -> Option<GroupHandle> {
        self.map().get(conv).cloned()
    }

    /// Every group, in no particular order.
    pub fn handles(&self) -> Vec<GroupHandle> {
        self.map().values().cloned().collect()
    }

    pub fn is_e2ee(&self, conv: &str) -> bool {
        self.map().contains_key(conv)
    }

    /// The direct conversations (keys `d:A,B,…`) that are end-to-end encrypted and that
    /// `user` takes part in.
    pub fn directs_of(&self, user: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .map()
            .keys()
            .filter(|k| {
                k.strip_prefix("d:")
                    .is_some_and(|users| users.split(',').any(|u| u == user))
            })
            .cloned()
            .collect();
        out.sort();
        out
    }

    /// The group of `conv`, registered as `g` if this node had none (a group another node
    /// created or loaded from the store).
    pub fn get_or_insert(&self, g: ConvGroup) -> GroupHandle {
        self.map()
            .entry(g.conv.clone())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(g)))
            .clone()
    }

    /// Registers a new group; false when the conversation has one already.
    pub fn insert(&self, g: ConvGroup) -> bool {
        let mut map = self.map();
        if map.contains_key(&g.conv) {
            return false;
        }
        map.insert(g.conv.clone(), Arc::new(tokio::sync::Mutex::new(g)));
        true
    }
}
