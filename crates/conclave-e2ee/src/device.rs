//! One client device: its MLS identity, key packages, groups and local history, in one SQLite
//! file (mode 0600) inside the client's state directory.
//!
//! Every operation that changes a group runs in one SQLite transaction together with the
//! bookkeeping around it (the last sequence number processed, the history record), so a crash
//! never leaves a half-merged group or a message processed twice.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Connection, SqliteStorageProvider};
use rusqlite::{OptionalExtension, params};

use crate::codec::JsonCodec;
mod acts;
pub use acts::LocalState;

use crate::history::HistoryKey;
use crate::payload::Payload;
use crate::{
    CIPHERSUITE, E2eeError, MAX_FORWARD_DISTANCE, MAX_PAST_EPOCHS, OUT_OF_ORDER_TOLERANCE, PADDING,
    SERVER_IDENTITY, identity, key_fingerprint, out_bytes, parse_identity, parse_message,
};

/// File name of the state database inside the client's state directory.
pub const STATE_FILE: &str = "e2ee.db";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conclave_device (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    user       TEXT NOT NULL,
    device     TEXT NOT NULL,
    sig_public BLOB NOT NULL,
    history_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS conclave_groups (
    conv      TEXT PRIMARY KEY,
    group_id  BLOB NOT NULL,
    last_seq  INTEGER NOT NULL,
    joined_seq INTEGER NOT NULL,
    active    INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS conclave_history (
    conv   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    sender TEXT NOT NULL,
    ts_ms  INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (conv, seq)
);
CREATE TABLE IF NOT EXISTS conclave_keys (
    id     BLOB PRIMARY KEY,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS conclave_file_keys (
    file_id TEXT NOT NULL,
    sender  TEXT NOT NULL,
    record  BLOB NOT NULL,
    PRIMARY KEY (file_id, sender)
);
CREATE TABLE IF NOT EXISTS conclave_pending_commits (
    conv   TEXT PRIMARY KEY,
    commit_bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS conclave_msg_state (
    conv   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    msg_id TEXT NOT NULL,
    state  BLOB,
    PRIMARY KEY (conv, seq)
);
CREATE INDEX IF NOT EXISTS conclave_msg_state_id ON conclave_msg_state(msg_id);
CREATE TABLE IF NOT EXISTS conclave_known_devices (
    user   TEXT NOT NULL,
    device TEXT NOT NULL,
    sig_public BLOB NOT NULL,
    PRIMARY KEY (user, device)
);
CREATE TABLE IF NOT EXISTS conclave_own_ahead (
    conv TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
";

/// OpenMLS's view of this device for one operation: RustCrypto and the SQLite storage.
pub struct Provider<'a> {
    crypto: &'a RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }
    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }
    fn rand(&self) -> &Self::RandProvider {
        self.crypto
    }
}

/// A commit this device made, to hand to the server. Nothing changes locally until the
/// server accepted it ([`Device::confirm`]) or refused it ([`Device::discard`]).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Vec<u8>,
}

/// A member of a group, as this device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub user: String,
    pub device: String,
    /// Fingerprint of the device's signature key ([`key_fingerprint`]).
    pub fingerprint: String,
}

/// What processing one message of a conversation's log did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// Seen before (its sequence number is not after the last one processed).
    Duplicate,
    /// From before this device joined the group (at or before the commit that added it):
    /// never readable here; another device of the account that was there has it.
    BeforeJoin,
    /// This device is not in the group (it was removed, or left): not readable here.
    NotMember,
    /// A message for members, decrypted.
    App {
        user: String,
        device: String,
        payload: Payload,
    },
    /// A commit was applied.
    Commit {
        epoch: u64,
        added: Vec<MemberInfo>,
        removed: Vec<MemberInfo>,
        /// This device was removed: it can read nothing more in this conversation.
        removed_self: bool,
    },
    /// A proposal of the server (a removal) was queued; some member will commit it.
    Proposal,
    /// Could not be read by this device (sent before it joined, or in an epoch it no longer
    /// has keys for, or not meant for it); skipped.
    Unreadable(String),
}

/// A device that has been added or whose key changed, in a conversation this device is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChange {
    pub user: String,
    pub device: String,
    pub fingerprint: String,
    /// True when this user/device was known before with another key.
    pub changed: bool,
}

/// A record of the local history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub conv: String,
    pub seq: u64,
    pub from: String,
    pub ts_ms: i64,
    pub payload: Payload,
}

/// One device's end-to-end state.
pub struct Device {
    pub(crate) conn: Connection,
    pub(crate) crypto: RustCrypto,
    pub(crate) signer: SignatureKeyPair,
    user: String,
    device: String,
    pub(crate) history: HistoryKey,
    history_reset: bool,
    /// Groups kept in memory between operations (by group id): loading one from the state
    /// file decodes its whole ratchet tree, which grows with the group. OpenMLS writes every
    /// change through to the state file, so a kept group is the stored one, as long as the
    /// transaction of each change commits: whenever one fails, every kept group is dropped.
    groups: RefCell<HashMap<Vec<u8>, MlsGroup>>,
}

/// At most this many groups are kept in memory (past it, the kept ones are dropped).
const MAX_KEPT_GROUPS: usize = 64;

impl Device {
    /// Opens (creating if needed) the state of `user`'s device in `dir`. The password unwraps
    /// the key of the local history; a new device gets a fresh signature key and device id.
    pub fn open(dir: &Path, user: &str, password: &str) -> Result<Device, E2eeError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| E2eeError::Refused(format!("state directory {}: {e}", dir.display())))?;
        let path = dir.join(STATE_FILE);
        let mut conn = Connection::open(&path)?;
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;
             PRAGMA secure_delete = ON;",
        )?;
        {
            let mut storage = SqliteStorageProvider::<JsonCodec, &mut Connection>::new(&mut conn);
            storage
                .run_migrations()
                .map_err(|e| E2eeError::Mls(format!("state migrations: {e}")))?;
        }
        conn.execute_batch(SCHEMA)?;
        let crypto = RustCrypto::default();
        let mut history_reset = false;
        let row: Option<(String, String, Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT user, device, sig_public, history_key FROM conclave_device WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let (device, signer, history) = match row {
            Some((stored_user, device, public, wrapped)) => {
                if stored_user != user {
                    return Err(E2eeError::Refused(format!(
                        "the state directory {} belongs to {stored_user}, not {user}; use another --state-dir",
                        dir.display()
                    )));
                }
                let storage = SqliteStorageProvider::<JsonCodec, &Connection>::new(&conn);
                let signer =
                    SignatureKeyPair::read(&storage, &public, CIPHERSUITE.signature_algorithm())
                        .ok_or_else(|| {
                            E2eeError::Mls("the device's signature key is missing".into())
                        })?;
                let history = match HistoryKey::unwrap(password, &wrapped) {
                    Ok(h) => h,
                    Err(E2eeError::WrongKey) => {
                        // The account's password changed (or this is the wrong one): the
                        // history sealed so far stays sealed; a new key seals what follows.
                        let (h, wrapped) = HistoryKey::create(password)?;
                        conn.execute(
                            "UPDATE conclave_device SET history_key = ?1 WHERE id = 1",
                            [wrapped],
                        )?;
                        history_reset = true;
                        h
                    }
                    Err(e) => return Err(e),
                };
                (device, signer, history)
            }
            None => {
                let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
                    .map_err(E2eeError::mls)?;
                let mut id = [0u8; 8];
                rand::Rng::fill(&mut rand::rng(), &mut id[..]);
                let device = hex::encode(id);
                let (history, wrapped) = HistoryKey::create(password)?;
                let storage = SqliteStorageProvider::<JsonCodec, &Connection>::new(&conn);
                signer.store(&storage)?;
                conn.execute(
                    "INSERT INTO conclave_device (id, user, device, sig_public, history_key)
                     VALUES (1, ?1, ?2, ?3, ?4)",
                    params![user, device, signer.public(), wrapped],
                )?;
                (device, signer, history)
            }
        };
        let d = Device {
            conn,
            crypto,
            signer,
            user: user.to_string(),
            device,
            history,
            history_reset,
            groups: RefCell::new(HashMap::new()),
        };
        d.drop_unconfirmed_joins()?;
        Ok(d)
    }

    /// External joins that were sent but never confirmed (the client stopped between the
    /// commit and the server's answer): dropped, so the next join starts over. If the server
    /// had taken the commit, the new external commit replaces that leaf (same signature
    /// key: OpenMLS removes it in the same commit).
    fn drop_unconfirmed_joins(&self) -> Result<(), E2eeError> {
        let convs: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT conv FROM conclave_groups WHERE joined_seq < 0")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for conv in convs {
            self.tx(|d| d.forget_old_group(&conv))?;
        }
        Ok(())
    }

    /// The password did not open the local history (it changed since): what was kept before
    /// stays sealed and unreadable here; new history is kept under the new password.
    pub fn history_reset(&self) -> bool {
        self.history_reset
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// This device's id (random, chosen when the state was created).
    pub fn device_id(&self) -> &str {
        &self.device
    }

    /// This device's fingerprint (its safety number).
    pub fn fingerprint(&self) -> String {
        key_fingerprint(self.signer.public())
    }

    fn provider(&self) -> Provider<'_> {
        Provider {
            crypto: &self.crypto,
            storage: SqliteStorageProvider::new(&self.conn),
        }
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(identity(&self.user, &self.device)).into(),
            signature_key: self.signer.public().into(),
        }
    }

    /// Runs `f` in one SQLite transaction: all of it lands, or none of it.
    /// Groups kept in memory are dropped unless it lands (they may hold what was rolled back).
    pub(crate) fn tx<R>(
        &self,
        f: impl FnOnce(&Self) -> Result<R, E2eeError>,
    ) -> Result<R, E2eeError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(r) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(r),
                Err(e) => {
                    self.groups.borrow_mut().clear();
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(e.into())
                }
            },
            Err(e) => {
                self.groups.borrow_mut().clear();
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Completes the commit `builder` began (pre-shared keys, the commit signed by this
    /// device) and stages it: it is merged only once the server has accepted it.
    fn stage(
        &self,
        provider: &Provider<'_>,
        builder: CommitBuilder<'_, Initial>,
    ) -> Result<CommitMessageBundle, E2eeError> {
        builder
            .load_psks(provider.storage())
            .map_err(E2eeError::mls)?
            .build(provider.rand(), provider.crypto(), &self.signer, |_| true)
            .map_err(E2eeError::mls)?
            .stage_commit(provider)
            .map_err(E2eeError::mls)
    }

    /// Keeps a group in memory for the next operation on it (see [`Device::load`]).
    fn keep(&self, group: MlsGroup) {
        let mut groups = self.groups.borrow_mut();
        if groups.len() >= MAX_KEPT_GROUPS {
            groups.clear();
        }
        groups.insert(group.group_id().as_slice().to_vec(), group);
    }

    /// Drops the kept copy of a group that is changed or deleted without it.
    fn evict(&self, gid: &GroupId) {
        self.groups.borrow_mut().remove(gid.as_slice());
    }

    /// `n` fresh key packages (each usable once) for the server to hand to inviters.
    pub fn key_packages(&self, n: usize) -> Result<Vec<Vec<u8>>, E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let bundle = KeyPackage::builder()
                    .build(CIPHERSUITE, &provider, &d.signer, d.credential())
                    .map_err(E2eeError::mls)?;
                out.push(
                    bundle
                        .key_package()
                        .tls_serialize_detached()
                        .map_err(E2eeError::mls)?,
                );
            }
            Ok(out)
        })
    }

    fn group_row(&self, conv: &str) -> Result<Option<(GroupId, u64, bool)>, E2eeError> {
        Ok(self
            .conn
            .query_row(
                "SELECT group_id, last_seq, active FROM conclave_groups WHERE conv = ?1",
                [conv],
                |r| {
                    Ok((
                        GroupId::from_slice(&r.get::<_, Vec<u8>>(0)?),
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, bool>(2)?,
                    ))
                },
            )
            .optional()?)
    }

    /// The conversation's group: the kept one (taken out; give it back with
    /// [`Device::keep`] once the operation has succeeded), or else the stored one.
    fn load(&self, conv: &str) -> Result<MlsGroup, E2eeError> {
        let (gid, _, active) = self.group_row(conv)?.ok_or(E2eeError::NoGroup)?;
        if !active {
            return Err(E2eeError::NoGroup);
        }
        if let Some(group) = self.groups.borrow_mut().remove(gid.as_slice()) {
            return Ok(group);
        }
        MlsGroup::load(self.provider().storage(), &gid)?.ok_or(E2eeError::NoGroup)
    }

    /// Whether this device is an active member of the conversation's group.
    pub fn has_group(&self, conv: &str) -> Result<bool, E2eeError> {
        Ok(matches!(self.group_row(conv)?, Some((_, _, true))))
    }

    /// Whether this device is in the conversation's group and the server confirmed how it
    /// got there (an external join counts once the server took its commit).
    pub fn confirmed(&self, conv: &str) -> Result<bool, E2eeError> {
        Ok(self
            .conn
            .query_row(
                "SELECT joined_seq >= 0 AND active FROM conclave_groups WHERE conv = ?1",
                [conv],
                |r| r.get::<_, bool>(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// The sequence number of the commit that brought this device into the conversation's
    /// group (messages up to it are from before it joined).
    pub fn joined_seq(&self, conv: &str) -> Result<Option<u64>, E2eeError> {
        Ok(self
            .conn
            .query_row(
                "SELECT joined_seq FROM conclave_groups WHERE conv = ?1",
                [conv],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .and_then(|s| u64::try_from(s).ok()))
    }

    /// Whether this device knows the conversation as end-to-end encrypted: it is or was in
    /// its group, or keeps local history of it.
    pub fn knows(&self, conv: &str) -> Result<bool, E2eeError> {
        let known: Option<i64> = self
            .conn
            .query_row(
                "SELECT 1 FROM conclave_groups WHERE conv = ?1
                 UNION ALL SELECT 1 FROM conclave_history WHERE conv = ?1 LIMIT 1",
                [conv],
                |r| r.get(0),
            )
            .optional()?;
        Ok(known.is_some())
    }

    /// Leaves the conversation's group on this device (the account left the room, or was
    /// kicked from it): the group's keys are deleted, the local history stays, and a later
    /// join starts over with an external commit.
    pub fn leave_group(&self, conv: &str) -> Result<(), E2eeError> {
        self.tx(|d| {
            let Some((gid, _, _)) = d.group_row(conv)? else {
                return Ok(());
            };
            d.evict(&gid);
            let provider = d.provider();
            if let Some(mut g) = MlsGroup::load(provider.storage(), &gid)? {
                g.delete(provider.storage())?;
            }
            d.conn.execute(
                "UPDATE conclave_groups SET active = 0 WHERE conv = ?1",
                [conv],
            )?;
            d.conn.execute(
                "DELETE FROM conclave_pending_commits WHERE conv = ?1",
                [conv],
            )?;
            Ok(())
        })
    }

    /// Remembers the commit this device sent, so that finding it in the log (after a crash
    /// between the server's answer and [`Device::confirm`]) merges it instead of failing.
    fn note_pending(&self, conv: &str, out: &Outgoing) -> Result<(), E2eeError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO conclave_pending_commits (conv, commit_bytes) VALUES (?1, ?2)",
            params![conv, out.commit],
        )?;
        Ok(())
    }

    fn clear_pending(&self, conv: &str) -> Result<(), E2eeError> {
        self.conn.execute(
            "DELETE FROM conclave_pending_commits WHERE conv = ?1",
            [conv],
        )?;
        Ok(())
    }

    fn is_own_pending(&self, conv: &str, data: &[u8]) -> Result<bool, E2eeError> {
        let stored: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT commit_bytes FROM conclave_pending_commits WHERE conv = ?1",
                [conv],
                |r| r.get(0),
            )
            .optional()?;
        Ok(stored.is_some_and(|c| c == data))
    }

    /// The last sequence number of the conversation's log this device has processed.
    pub fn last_seq(&self, conv: &str) -> Result<Option<u64>, E2eeError> {
        Ok(self.group_row(conv)?.map(|(_, s, _)| s))
    }

    /// Conversations this device is an active member of.
    pub fn convs(&self) -> Result<Vec<String>, E2eeError> {
        let mut st = self
            .conn
            .prepare("SELECT conv FROM conclave_groups WHERE active = 1 ORDER BY conv")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The group's epoch, as this device has it.
    pub fn epoch(&self, conv: &str) -> Result<u64, E2eeError> {
        let group = self.load(conv)?;
        let epoch = group.epoch().as_u64();
        self.keep(group);
        Ok(epoch)
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .padding_size(PADDING)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                OUT_OF_ORDER_TOLERANCE,
                MAX_FORWARD_DISTANCE,
            ))
            .use_ratchet_tree_extension(true)
            .build()
    }

    fn set_group(&self, conv: &str, gid: &GroupId, seq: u64) -> Result<(), E2eeError> {
        self.conn.execute(
            "INSERT INTO conclave_groups (conv, group_id, last_seq, joined_seq, active)
             VALUES (?1, ?2, ?3, ?3, 1)
             ON CONFLICT (conv) DO UPDATE SET group_id = ?2, last_seq = ?3, joined_seq = ?3,
                 active = 1",
            params![conv, gid.as_slice(), seq as i64],
        )?;
        Ok(())
    }

    fn forget_old_group(&self, conv: &str) -> Result<(), E2eeError> {
        if let Some((gid, _, _)) = self.group_row(conv)? {
            self.evict(&gid);
            let provider = self.provider();
            if let Some(mut g) = MlsGroup::load(provider.storage(), &gid)? {
                g.delete(provider.storage())?;
            }
            self.conn
                .execute("DELETE FROM conclave_groups WHERE conv = ?1", [conv])?;
        }
        self.clear_pending(conv)?;
        Ok(())
    }

    /// Creates the group of a new conversation, with the server (whose signature public key is
    /// `server_key`) as external sender. Returns the GroupInfo (with the ratchet tree) that the
    /// server needs to follow the group.
    pub fn create_group(&self, conv: &str, server_key: &[u8]) -> Result<Vec<u8>, E2eeError> {
        self.tx(|d| {
            d.forget_old_group(conv)?;
            let provider = d.provider();
            let mut gid = [0u8; 16];
            rand::Rng::fill(&mut rand::rng(), &mut gid[..]);
            let gid = GroupId::from_slice(&gid);
            let server = ExternalSender::new(
                server_key.to_vec().into(),
                BasicCredential::new(SERVER_IDENTITY.to_vec()).into(),
            );
            let extensions = Extensions::single(Extension::ExternalSenders(vec![server]))
                .map_err(E2eeError::mls)?;
            let config = MlsGroupCreateConfig::builder()
                .ciphersuite(CIPHERSUITE)
                .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
                .padding_size(PADDING)
                .max_past_epochs(MAX_PAST_EPOCHS)
                .sender_ratchet_configuration(SenderRatchetConfiguration::new(
                    OUT_OF_ORDER_TOLERANCE,
                    MAX_FORWARD_DISTANCE,
                ))
                .use_ratchet_tree_extension(true)
                .with_group_context_extensions(extensions)
                .build();
            let group = MlsGroup::new_with_group_id(
                &provider,
                &d.signer,
                &config,
                gid.clone(),
                d.credential(),
            )
            .map_err(E2eeError::mls)?;
            d.set_group(conv, &gid, 0)?;
            let gi = group
                .export_group_info(provider.crypto(), &d.signer, true)
                .map_err(E2eeError::mls)?;
            d.keep(group);
            out_bytes(&gi)
        })
    }

    /// The conversation's current GroupInfo with its ratchet tree, signed by this device.
    pub fn group_info(&self, conv: &str) -> Result<Vec<u8>, E2eeError> {
        let group = self.load(conv)?;
        let gi = group
            .export_group_info(&self.crypto, &self.signer, true)
            .map_err(E2eeError::mls)?;
        self.keep(group);
        out_bytes(&gi)
    }

    /// A commit adding the devices of these key packages (each validated first). Pending
    /// proposals of the server are committed with it.
    pub fn add_members(&self, conv: &str, key_packages: &[Vec<u8>]) -> Result<Outgoing, E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let mut group = d.load(conv)?;
            let mut kps = Vec::with_capacity(key_packages.len());
            for bytes in key_packages {
                let kp = KeyPackageIn::tls_deserialize_exact(bytes)
                    .map_err(|e| E2eeError::Malformed(e.to_string()))?
                    .validate(provider.crypto(), ProtocolVersion::Mls10)
                    .map_err(|e| E2eeError::Refused(format!("invalid key package: {e:?}")))?;
                kps.push(kp);
            }
            let bundle = d.stage(&provider, group.commit_builder().propose_adds(kps))?;
            d.keep(group);
            let out = outgoing(bundle)?;
            d.note_pending(conv, &out)?;
            Ok(out)
        })
    }

    /// A commit of the proposals queued in the group (the server's removals), if any.
    pub fn commit_pending(&self, conv: &str) -> Result<Option<Outgoing>, E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let mut group = d.load(conv)?;
            if group.pending_proposals().next().is_none() || group.pending_commit().is_some() {
                d.keep(group);
                return Ok(None);
            }
            let bundle = d.stage(
                &provider,
                group.commit_builder().consume_proposal_store(true),
            )?;
            d.keep(group);
            let out = outgoing(bundle)?;
            d.note_pending(conv, &out)?;
            Ok(Some(out))
        })
    }

    /// A commit that only refreshes this device's own keys (post-compromise security).
    pub fn self_update(&self, conv: &str) -> Result<Outgoing, E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let mut group = d.load(conv)?;
            let bundle = d.stage(&provider, group.commit_builder().force_self_update(true))?;
            d.keep(group);
            let out = outgoing(bundle)?;
            d.note_pending(conv, &out)?;
            Ok(out)
        })
    }

    /// The server accepted this device's pending commit as `seq` of the conversation's log:
    /// merge it.
    pub fn confirm(&self, conv: &str, seq: u64) -> Result<(), E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let mut group = d.load(conv)?;
            group
                .merge_pending_commit(&provider)
                .map_err(E2eeError::mls)?;
            d.conn.execute(
                "UPDATE conclave_groups SET last_seq = MAX(last_seq, ?2) WHERE conv = ?1",
                params![conv, seq as i64],
            )?;
            d.clear_pending(conv)?;
            d.note_members(&group)?;
            d.keep(group);
            Ok(())
        })
    }

    /// The server refused this device's pending commit (another commit won the epoch): drop
    /// it. An external join that was refused leaves no group behind.
    pub fn discard(&self, conv: &str) -> Result<(), E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let Some((gid, _, _)) = d.group_row(conv)? else {
                return Ok(());
            };
            d.evict(&gid);
            if let Some(mut group) = MlsGroup::load(provider.storage(), &gid)? {
                let external_pending = group
                    .pending_commit()
                    .is_some_and(|c| c.update_path_leaf_node().is_some())
                    && group.epoch().as_u64() == 0;
                group
                    .clear_pending_commit(provider.storage())
                    .map_err(E2eeError::mls)?;
                d.clear_pending(conv)?;
                let joined: i64 = d.conn.query_row(
                    "SELECT joined_seq FROM conclave_groups WHERE conv = ?1",
                    [conv],
                    |r| r.get(0),
                )?;
                if external_pending && joined < 0 {
                    d.forget_old_group(conv)?;
                }
            }
            Ok(())
        })
    }

    /// Joins a group from a Welcome; `seq` is the sequence number of the commit that added
    /// this device (messages up to it are not for it).
    pub fn join_welcome(&self, conv: &str, welcome: &[u8], seq: u64) -> Result<(), E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let welcome = match parse_message(welcome)?.extract() {
                MlsMessageBodyIn::Welcome(w) => w,
                _ => return Err(E2eeError::Malformed("not a Welcome".into())),
            };
            let group =
                StagedWelcome::new_from_welcome(&provider, &Self::join_config(), welcome, None)
                    .map_err(E2eeError::mls)?
                    .into_group(&provider)
                    .map_err(E2eeError::mls)?;
            d.forget_old_group(conv)?;
            d.set_group(conv, group.group_id(), seq)?;
            d.note_members(&group)?;
            d.keep(group);
            Ok(())
        })
    }

    /// An external commit joining the group of this GroupInfo (a public room this account
    /// may enter, or a conversation another device of the account is in). Confirm or discard
    /// it like any commit.
    pub fn join_external(&self, conv: &str, group_info: &[u8]) -> Result<Outgoing, E2eeError> {
        self.tx(|d| {
            let provider = d.provider();
            let gi = crate::parse_group_info(group_info)?;
            d.forget_old_group(conv)?;
            let (group, bundle) = MlsGroup::external_commit_builder()
                .with_config(Self::join_config())
                .build_group(&provider, gi, d.credential())
                .map_err(E2eeError::mls)?
                .load_psks(provider.storage())
                .map_err(E2eeError::mls)?
                .build(provider.rand(), provider.crypto(), &d.signer, |_| true)
                .map_err(E2eeError::mls)?
                .finalize(&provider)
                .map_err(E2eeError::mls)?;
            // joined_seq -1 marks a join not yet accepted.
            d.conn.execute(
                "INSERT INTO conclave_groups (conv, group_id, last_seq, joined_seq, active)
                 VALUES (?1, ?2, 0, -1, 1)",
                params![conv, group.group_id().as_slice()],
            )?;
            d.keep(group);
            outgoing(bundle)
        })
    }

    /// The server accepted this device's external join as `seq`.
    pub fn confirm_join(&self, conv: &str, seq: u64) -> Result<(), E2eeError> {
        self.confirm(conv, seq)?;
        self.conn.execute(
            "UPDATE conclave_groups SET joined_seq = ?2, last_seq = ?2 WHERE conv = ?1",
            params![conv, seq as i64],
        )?;
        Ok(())
    }

    /// Encrypts a payload for the conversation's members.
    pub fn encrypt(&self, conv: &str, payload: &Payload) -> Result<Vec<u8>, E2eeError> {
        let plain = payload.encode()?;
        self.tx(|d| {
            let provider = d.provider();
            let mut group = d.load(conv)?;
            if group.pending_proposals().next().is_some() {
                return Err(E2eeError::Refused(
                    "a removal is pending in this conversation; it must be committed first".into(),
                ));
            }
            let m = group
                .create_message(&provider, &d.signer, &plain)
                .map_err(E2eeError::mls)?;
            d.keep(group);
            out_bytes(&m)
        })
    }

    /// Records a message this device sent (it does not come back to it).
    pub fn record_own(
        &self,
        conv: &str,
        seq: u64,
        ts_ms: i64,
        payload: &Payload,
    ) -> Result<(), E2eeError> {
        self.tx(|d| {
            d.put_history(conv, seq, &d.user, ts_ms, payload)?;
            // Entries before this one may still be on their way to this device (its send was
            // ordered after them, and their events wait behind the send's lock): the position
            // moves past this send only once they are processed, or they would be taken for
            // duplicates and lost.
            let last: Option<i64> = d
                .conn
                .query_row(
                    "SELECT last_seq FROM conclave_groups WHERE conv = ?1",
                    [conv],
                    |r| r.get(0),
                )
                .optional()?;
            match last {
                Some(last) if (seq as i64) > last + 1 => {
                    d.conn.execute(
                        "INSERT OR IGNORE INTO conclave_own_ahead (conv, seq) VALUES (?1, ?2)",
                        params![conv, seq as i64],
                    )?;
                }
                _ => {
                    d.conn.execute(
                        "UPDATE conclave_groups SET last_seq = MAX(last_seq, ?2) WHERE conv = ?1",
                        params![conv, seq as i64],
                    )?;
                    d.advance_own(conv)?;
                }
            }
            Ok(())
        })
    }

    /// Moves the position past this device's own sends that directly follow it (see
    /// [`Device::record_own`]), and forgets those it has passed.
    fn advance_own(&self, conv: &str) -> Result<(), E2eeError> {
        // Bounded by the rows there are: each round takes one.
        loop {
            let n = self.conn.execute(
                "UPDATE conclave_groups SET last_seq = last_seq + 1 WHERE conv = ?1
                 AND EXISTS (SELECT 1 FROM conclave_own_ahead o
                             WHERE o.conv = ?1 AND o.seq = conclave_groups.last_seq + 1)",
                [conv],
            )?;
            let gone = self.conn.execute(
                "DELETE FROM conclave_own_ahead WHERE conv = ?1
                 AND seq <= (SELECT last_seq FROM conclave_groups WHERE conv = ?1)",
                [conv],
            )?;
            if n == 0 || gone == 0 {
                return Ok(());
            }
        }
    }

    /// Processes the conversation's log entry `seq` (content type `ct`, from account `from`),
    /// in order. Entries already processed are reported as [`Processed::Duplicate`].
    pub fn process(
        &self,
        conv: &str,
        seq: u64,
        from: &str,
        ts_ms: i64,
        data: &[u8],
    ) -> Result<Processed, E2eeError> {
        let Some((_, last, active)) = self.group_row(conv)? else {
            return Err(E2eeError::NoGroup);
        };
        if seq <= last {
            // Read during an earlier membership (a catch-up from an account position that
            // lags this device, after it left and joined again): a duplicate, not unreadable.
            if self.joined_seq(conv)?.is_some_and(|j| seq <= j) && !self.has_history(conv, seq)? {
                return Ok(Processed::BeforeJoin);
            }
            return Ok(Processed::Duplicate);
        }
        if !active {
            self.bump(conv, seq)?;
            return Ok(Processed::NotMember);
        }
        let own: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM conclave_own_ahead WHERE conv = ?1 AND seq = ?2",
                params![conv, seq as i64],
                |r| r.get(0),
            )
            .optional()?;
        if own.is_some() {
            // This device's own send, recorded when it was sent.
            self.bump(conv, seq)?;
            return Ok(Processed::Duplicate);
        }
        let result = self.tx(|d| {
            let r = if d.is_own_pending(conv, data)? {
                d.merge_own(conv)?
            } else {
                d.process_inner(conv, seq, from, ts_ms, data)?
            };
            d.conn.execute(
                "UPDATE conclave_groups SET last_seq = ?2 WHERE conv = ?1",
                params![conv, seq as i64],
            )?;
            d.advance_own(conv)?;
            Ok(r)
        });
        match result {
            Ok(p) => Ok(p),
            Err(e @ E2eeError::Db(_)) => Err(e),
            Err(e) => {
                // Unreadable for this device; never retried.
                self.bump(conv, seq)?;
                Ok(Processed::Unreadable(e.to_string()))
            }
        }
    }

    /// This device's own commit, found in the log before it was confirmed: merged now.
    fn merge_own(&self, conv: &str) -> Result<Processed, E2eeError> {
        let provider = self.provider();
        let mut group = self.load(conv)?;
        if group.pending_commit().is_none() {
            return Err(E2eeError::Mls(
                "this device's own commit is in the log but no longer staged here".into(),
            ));
        }
        let before = members_of(&group);
        group
            .merge_pending_commit(&provider)
            .map_err(E2eeError::mls)?;
        self.clear_pending(conv)?;
        let (added, removed) = member_diff(&before, &members_of(&group));
        self.note_members(&group)?;
        let epoch = group.epoch().as_u64();
        self.keep(group);
        Ok(Processed::Commit {
            epoch,
            added,
            removed,
            removed_self: false,
        })
    }

    fn bump(&self, conv: &str, seq: u64) -> Result<(), E2eeError> {
        self.conn.execute(
            "UPDATE conclave_groups SET last_seq = MAX(last_seq, ?2) WHERE conv = ?1",
            params![conv, seq as i64],
        )?;
        self.advance_own(conv)
    }

    fn process_inner(
        &self,
        conv: &str,
        seq: u64,
        from: &str,
        ts_ms: i64,
        data: &[u8],
    ) -> Result<Processed, E2eeError> {
        let provider = self.provider();
        let mut group = self.load(conv)?;
        let pm = parse_message(data)?
            .try_into_protocol_message()
            .map_err(|e| E2eeError::Malformed(format!("{e:?}")))?;
        if pm.group_id() != group.group_id() {
            return Err(E2eeError::Malformed("a message of another group".into()));
        }
        if pm.epoch() != group.epoch() && pm.content_type() != ContentType::Application {
            return Err(E2eeError::WrongEpoch);
        }
        let processed = group
            .process_message(&provider, pm)
            .map_err(E2eeError::mls)?;
        let sender = processed.sender().clone();
        let credential = processed.credential().clone();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let (user, device) = parse_identity(&credential)
                    .ok_or_else(|| E2eeError::Malformed("a sender without identity".into()))?;
                if user != from {
                    return Err(E2eeError::Refused(format!(
                        "the server says {from} sent it but it is signed by {user}"
                    )));
                }
                let payload = Payload::decode(&app.into_bytes())?;
                self.put_history(conv, seq, &user, ts_ms, &payload)?;
                self.keep(group);
                Ok(Processed::App {
                    user,
                    device,
                    payload,
                })
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                // Only the server's (external sender 0) removals are queued.
                let from_server =
                    matches!(sender, Sender::External(i) if i == SenderExtensionIndex::new(0));
                if !from_server || !matches!(p.proposal(), Proposal::Remove(_)) {
                    return Err(E2eeError::Refused(
                        "only the server's removal proposals are accepted".into(),
                    ));
                }
                group
                    .store_pending_proposal(provider.storage(), *p)
                    .map_err(E2eeError::mls)?;
                self.keep(group);
                Ok(Processed::Proposal)
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let before = members_of(&group);
                let removed_self = staged.self_removed();
                group
                    .merge_staged_commit(&provider, *staged)
                    .map_err(E2eeError::mls)?;
                self.clear_pending(conv)?;
                let (added, removed) = member_diff(&before, &members_of(&group));
                if removed_self {
                    self.conn.execute(
                        "UPDATE conclave_groups SET active = 0 WHERE conv = ?1",
                        [conv],
                    )?;
                } else {
                    self.note_members(&group)?;
                }
                let epoch = group.epoch().as_u64();
                if !removed_self {
                    self.keep(group);
                }
                Ok(Processed::Commit {
                    epoch,
                    added,
                    removed,
                    removed_self,
                })
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(E2eeError::Refused(
                "external join proposals are not used here".into(),
            )),
            #[allow(unreachable_patterns)]
            _ => Err(E2eeError::Refused("an unexpected kind of message".into())),
        }
    }

    /// The members of the conversation's group.
    pub fn members(&self, conv: &str) -> Result<Vec<MemberInfo>, E2eeError> {
        let group = self.load(conv)?;
        let members = members_of(&group);
        self.keep(group);
        Ok(members)
    }

    /// Remembers the devices of `group`'s members as known.
    fn note_members(&self, group: &MlsGroup) -> Result<(), E2eeError> {
        for m in group.members() {
            if let Some((user, device)) = parse_identity(&m.credential) {
                self.conn.execute(
                    "INSERT INTO conclave_known_devices (user, device, sig_public)
                     VALUES (?1, ?2, ?3)
                     ON CONFLICT (user, device) DO UPDATE SET sig_public = ?3",
                    params![user, device, m.signature_key],
                )?;
            }
        }
        Ok(())
    }

    /// Devices in the conversation that this device has not seen before, or that have a new
    /// signature key since it last saw them (to announce in the conversation). Call before
    /// processing a commit, with the commit's additions.
    pub fn device_changes(&self, members: &[MemberInfo]) -> Result<Vec<DeviceChange>, E2eeError> {
        let mut out = Vec::new();
        for m in members {
            let known: Option<Vec<u8>> = self
                .conn
                .query_row(
                    "SELECT sig_public FROM conclave_known_devices WHERE user = ?1 AND device = ?2",
                    params![m.user, m.device],
                    |r| r.get(0),
                )
                .optional()?;
            match known {
                None => out.push(DeviceChange {
                    user: m.user.clone(),
                    device: m.device.clone(),
                    fingerprint: m.fingerprint.clone(),
                    changed: false,
                }),
                Some(k) if key_fingerprint(&k) != m.fingerprint => out.push(DeviceChange {
                    user: m.user.clone(),
                    device: m.device.clone(),
                    fingerprint: m.fingerprint.clone(),
                    changed: true,
                }),
                Some(_) => {}
            }
        }
        Ok(out)
    }

    /// Every device of `user` this device knows, with fingerprints (safety numbers).
    pub fn known_devices(&self, user: &str) -> Result<Vec<MemberInfo>, E2eeError> {
        let mut st = self.conn.prepare(
            "SELECT device, sig_public FROM conclave_known_devices WHERE user = ?1 ORDER BY device",
        )?;
        let rows = st.query_map([user], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, key) = row?;
            out.push(MemberInfo {
                user: user.to_string(),
                device,
                fingerprint: key_fingerprint(&key),
            });
        }
        Ok(out)
    }

    /// The key and description of an end-to-end encrypted file this device was sent (or
    /// sent), by the file's id and the account that offered it: a description sent by anyone
    /// else for the same id is never used for it.
    pub fn file(&self, file_id: &str, sender: &str) -> Result<Option<Payload>, E2eeError> {
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT record FROM conclave_file_keys WHERE file_id = ?1 AND sender = ?2",
                [file_id, sender],
                |r| r.get(0),
            )
            .optional()?;
        match sealed {
            None => Ok(None),
            Some(s) => {
                let ad = file_ad(file_id, sender);
                Ok(Some(Payload::decode(
                    &self.history.open(ad.as_bytes(), &s)?,
                )?))
            }
        }
    }

    /// The key of a blockcast message, if this device was given it.
    pub fn sealed_key(&self, id: &[u8; 16]) -> Result<Option<[u8; 32]>, E2eeError> {
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT record FROM conclave_keys WHERE id = ?1",
                [&id[..]],
                |r| r.get(0),
            )
            .optional()?;
        match sealed {
            None => Ok(None),
            Some(s) => {
                let plain = self.history.open(b"conclave-key-v1", &s)?;
                Ok(<[u8; 32]>::try_from(plain.as_slice()).ok())
            }
        }
    }

    /// Replaces what the local history holds for `seq` (a blockcast message, once opened).
    pub fn record(
        &self,
        conv: &str,
        seq: u64,
        from: &str,
        ts_ms: i64,
        payload: &Payload,
    ) -> Result<(), E2eeError> {
        self.put_history(conv, seq, from, ts_ms, payload)
    }

    /// Leaves a conversation's group locally (a group the server did not take).
    pub fn forget_group(&self, conv: &str) -> Result<(), E2eeError> {
        self.tx(|d| d.forget_old_group(conv))
    }

    /// Whether the local history holds the conversation's entry `seq`.
    fn has_history(&self, conv: &str, seq: u64) -> Result<bool, E2eeError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM conclave_history WHERE conv = ?1 AND seq = ?2",
                params![conv, seq.min(i64::MAX as u64) as i64],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub(crate) fn put_history(
        &self,
        conv: &str,
        seq: u64,
        from: &str,
        ts_ms: i64,
        payload: &Payload,
    ) -> Result<(), E2eeError> {
        if let Payload::SealedKey { id, key } = payload {
            self.conn.execute(
                "INSERT OR REPLACE INTO conclave_keys (id, record) VALUES (?1, ?2)",
                params![&id[..], self.history.seal(b"conclave-key-v1", key)],
            )?;
            return Ok(());
        }
        if let Payload::File { file_id, .. } = payload {
            // Kept under its sender: only the account that offered a file can describe it.
            let ad = file_ad(file_id, from);
            self.conn.execute(
                "INSERT OR REPLACE INTO conclave_file_keys (file_id, sender, record)
                 VALUES (?1, ?2, ?3)",
                params![
                    file_id,
                    from,
                    self.history.seal(ad.as_bytes(), &payload.encode()?)
                ],
            )?;
        }
        let ad = format!("conclave-local-v1|{conv}|{seq}");
        let sealed = self.history.seal(ad.as_bytes(), &payload.encode()?);
        self.conn.execute(
            "INSERT OR REPLACE INTO conclave_history (conv, seq, sender, ts_ms, record)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![conv, seq as i64, from, ts_ms, sealed],
        )?;
        Ok(())
    }

    fn history_rows(
        &self,
        sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<HistoryEntry>, E2eeError> {
        let mut st = self.conn.prepare(sql)?;
        let rows = st.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (conv, seq, from, ts_ms, sealed) = row?;
            let ad = format!("conclave-local-v1|{conv}|{seq}");
            // Records sealed under an earlier password's key are not readable any more.
            let Ok(plain) = self.history.open(ad.as_bytes(), &sealed) else {
                continue;
            };
            let payload = Payload::decode(&plain)?;
            out.push(HistoryEntry {
                conv,
                seq: seq as u64,
                from,
                ts_ms,
                payload,
            });
        }
        Ok(out)
    }

    /// Local history of a conversation, oldest first: at most `limit` entries before `before`.
    pub fn history(
        &self,
        conv: &str,
        limit: u32,
        before: Option<u64>,
    ) -> Result<Vec<HistoryEntry>, E2eeError> {
        let before = before.map(|b| b as i64).unwrap_or(i64::MAX);
        let mut rows = self.history_rows(
            "SELECT conv, seq, sender, ts_ms, record FROM conclave_history
             WHERE conv = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            &[&conv, &before, &(limit as i64)],
        )?;
        rows.reverse();
        Ok(rows)
    }

    /// Local search: text messages (in `conv`, or everywhere) containing every word of
    /// `query`, case-insensitively; newest first.
    pub fn search(
        &self,
        query: &str,
        conv: Option<&str>,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, E2eeError> {
        let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
        let all = match conv {
            Some(c) => self.history_rows(
                "SELECT conv, seq, sender, ts_ms, record FROM conclave_history
                 WHERE conv = ?1 ORDER BY ts_ms DESC, seq DESC",
                &[&c],
            )?,
            None => self.history_rows(
                "SELECT conv, seq, sender, ts_ms, record FROM conclave_history
                 ORDER BY ts_ms DESC, seq DESC",
                &[],
            )?,
        };
        Ok(all
            .into_iter()
            .filter(|e| match &e.payload {
                Payload::Body { data, .. } => {
                    let text = String::from_utf8_lossy(data).to_lowercase();
                    !words.is_empty() && words.iter().all(|w| text.contains(w.as_str()))
                }
                Payload::File { name, .. } => {
                    let name = name.to_lowercase();
                    !words.is_empty() && words.iter().all(|w| name.contains(w.as_str()))
                }
                Payload::SealedKey { .. } | Payload::Sealed { .. } | Payload::Act { .. } => false,
            })
            .take(limit as usize)
            .collect())
    }
}

/// What a file's sealed description is bound to: the file and the account that sent it.
fn file_ad(file_id: &str, sender: &str) -> String {
    format!("conclave-file-v2|{file_id}|{sender}")
}

fn members_of(group: &MlsGroup) -> Vec<MemberInfo> {
    group
        .members()
        .filter_map(|m| {
            parse_identity(&m.credential).map(|(user, device)| MemberInfo {
                user,
                device,
                fingerprint: key_fingerprint(&m.signature_key),
            })
        })
        .collect()
}

/// Who a commit added and removed: the members after it that were not there before, and the
/// other way round.
fn member_diff(before: &[MemberInfo], after: &[MemberInfo]) -> (Vec<MemberInfo>, Vec<MemberInfo>) {
    let added = after
        .iter()
        .filter(|m| !before.contains(m))
        .cloned()
        .collect();
    let removed = before
        .iter()
        .filter(|m| !after.contains(m))
        .cloned()
        .collect();
    (added, removed)
}

fn outgoing(bundle: CommitMessageBundle) -> Result<Outgoing, E2eeError> {
    let (commit, welcome, group_info) = bundle.into_contents();
    let group_info = group_info
        .ok_or_else(|| E2eeError::Mls("the commit made no GroupInfo".into()))
        .and_then(|gi| out_bytes(&MlsMessageOut::from(gi)))?;
    let welcome = match welcome {
        Some(w) => Some(out_bytes(&MlsMessageOut::from_welcome(
            w,
            ProtocolVersion::Mls10,
        ))?),
        None => None,
    };
    Ok(Outgoing {
        commit: out_bytes(&commit)?,
        welcome,
        group_info,
    })
}
