//! The server's side of MLS: the delivery and authentication service.
//!
//! For each end-to-end encrypted conversation the server keeps the group's *public* state (an
//! OpenMLS `PublicGroup`: the ratchet tree, the group context, the transcript), never a secret.
//! With it the server validates each commit before ordering it: signatures, epoch, membership,
//! and that the change is authorised (see [`Change`]); a commit for a stale epoch, a forged
//! or replayed one is refused. As the groups' external sender, the server signs the Remove
//! proposals of kicks and bans.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

use crate::{CIPHERSUITE, E2eeError, SERVER_IDENTITY, parse_identity, parse_message};

/// The server's MLS view for one operation.
struct DsProvider<'a> {
    crypto: &'a RustCrypto,
    storage: &'a MemoryStorage,
}

impl<'a> OpenMlsProvider for DsProvider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &Self::StorageProvider {
        self.storage
    }
    fn crypto(&self) -> &Self::CryptoProvider {
        self.crypto
    }
    fn rand(&self) -> &Self::RandProvider {
        self.crypto
    }
}

/// The server's signature key as external sender of every group.
pub struct ServerSigner(SignatureKeyPair);

impl ServerSigner {
    pub fn generate() -> Result<ServerSigner, E2eeError> {
        SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
            .map(ServerSigner)
            .map_err(E2eeError::mls)
    }

    /// The key as bytes to keep (secret: seal it at rest).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ServerSigner, E2eeError> {
        serde_json::from_slice(bytes)
            .map(ServerSigner)
            .map_err(|_| E2eeError::Malformed("a stored server signature key".into()))
    }

    /// The public key clients put in their groups' external senders.
    pub fn public(&self) -> &[u8] {
        self.0.public()
    }
}

/// A group member as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub index: u32,
    pub user: String,
    pub device: String,
}

/// What a commit does, for the server to authorise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The new epoch once applied.
    pub epoch: u64,
    /// Who committed: a member's (user, device), or for an external commit the joiner.
    pub committer: (String, String),
    /// An external commit: the committer joins with it.
    pub external: bool,
    /// Devices added (by Add proposals, or the external joiner).
    pub added: Vec<(String, String)>,
    /// Devices removed.
    pub removed: Vec<(String, String)>,
}

/// One conversation's public group state.
pub struct GroupState {
    storage: MemoryStorage,
    group_id: GroupId,
}

/// A validated commit, to apply once it is durably ordered.
pub struct Validated {
    pub change: Change,
    next: GroupState,
}

impl Validated {
    /// The group state after the commit.
    pub fn into_state(self) -> GroupState {
        self.next
    }
}

impl GroupState {
    /// Starts following a new group from its creator's GroupInfo: it must carry the ratchet
    /// tree, have exactly one member whose credential is `creator`'s, use Conclave's
    /// ciphersuite, be at epoch 0 and name this server (`server_key`) as its only external
    /// sender.
    pub fn create(
        group_info: &[u8],
        creator: &str,
        server_key: &[u8],
    ) -> Result<GroupState, E2eeError> {
        let crypto = RustCrypto::default();
        let storage = MemoryStorage::default();
        let gi = crate::parse_group_info(group_info)?;
        if gi.ciphersuite() != CIPHERSUITE {
            return Err(E2eeError::Refused(
                "the group uses another ciphersuite".into(),
            ));
        }
        let tree = gi
            .extensions()
            .ratchet_tree()
            .map(|t| t.ratchet_tree().clone())
            .ok_or_else(|| E2eeError::Refused("the GroupInfo has no ratchet tree".into()))?;
        let (group, _) =
            PublicGroup::from_external(&crypto, &storage, tree, gi, ProposalStore::new())
                .map_err(|e| E2eeError::Refused(format!("invalid group: {e:?}")))?;
        if group.group_context().epoch().as_u64() != 0 {
            return Err(E2eeError::Refused("a new group starts at epoch 0".into()));
        }
        let members: Vec<Member> = group.members().collect();
        let ok_member = members.len() == 1
            && parse_identity(&members[0].credential).is_some_and(|(u, _)| u == creator);
        if !ok_member {
            return Err(E2eeError::Refused(
                "a new group has exactly one member: its creator".into(),
            ));
        }
        let senders = group
            .group_context()
            .extensions()
            .external_senders()
            .cloned()
            .unwrap_or_default();
        let expected = ExternalSender::new(
            server_key.to_vec().into(),
            BasicCredential::new(SERVER_IDENTITY.to_vec()).into(),
        );
        let server_ok = senders.len() == 1 && senders[0] == expected;
        if !server_ok {
            return Err(E2eeError::Refused(
                "the group must have this server as its only external sender".into(),
            ));
        }
        let group_id = group.group_id().clone();
        Ok(GroupState { storage, group_id })
    }

    /// The state as bytes to store.
    pub fn to_bytes(&self) -> Result<Vec<u8>, E2eeError> {
        let values = self
            .storage
            .values
            .read()
            .map_err(|_| E2eeError::Mls("group state lock poisoned".into()))?;
        let mut entries: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
        entries.sort();
        postcard::to_allocvec(&entries).map_err(|e| E2eeError::Mls(e.to_string()))
    }

    pub fn from_bytes(group_id: &[u8], bytes: &[u8]) -> Result<GroupState, E2eeError> {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = postcard::from_bytes(bytes)
            .map_err(|e| E2eeError::Malformed(format!("stored group state: {e}")))?;
        let storage = MemoryStorage {
            values: std::sync::RwLock::new(entries.into_iter().collect()),
        };
        Ok(GroupState {
            storage,
            group_id: GroupId::from_slice(group_id),
        })
    }

    fn duplicate(&self) -> GroupState {
        let values = self
            .storage
            .values
            .read()
            .map(|v| v.clone())
            .unwrap_or_default();
        GroupState {
            storage: MemoryStorage {
                values: std::sync::RwLock::new(values),
            },
            group_id: self.group_id.clone(),
        }
    }

    fn group(&self) -> Result<PublicGroup, E2eeError> {
        PublicGroup::load(&self.storage, &self.group_id)
            .map_err(E2eeError::mls)?
            .ok_or_else(|| E2eeError::Mls("the group's public state is missing".into()))
    }

    pub fn group_id(&self) -> &[u8] {
        self.group_id.as_slice()
    }

    pub fn epoch(&self) -> Result<u64, E2eeError> {
        Ok(self.group()?.group_context().epoch().as_u64())
    }

    /// The group's members.
    pub fn members(&self) -> Result<Vec<Leaf>, E2eeError> {
        Ok(self
            .group()?
            .members()
            .filter_map(|m| {
                parse_identity(&m.credential).map(|(user, device)| Leaf {
                    index: m.index.u32(),
                    user,
                    device,
                })
            })
            .collect())
    }

    /// Validates a commit sent by the authenticated account `author` against the current
    /// epoch. The result says what it changes; nothing changes here until the caller keeps
    /// [`Validated::into_state`].
    ///
    /// Refused: anything but a public-message commit of this group at this epoch with valid
    /// signatures; a committer that is not `author`; proposals other than Add, Update and
    /// Remove; a Remove that neither the server proposed nor concerns the committer's own
    /// devices; an external commit that adds anything but the joiner itself.
    pub fn validate_commit(&self, commit: &[u8], author: &str) -> Result<Validated, E2eeError> {
        let crypto = RustCrypto::default();
        let next = self.duplicate();
        let group = next.group()?;
        let pm = match parse_message(commit)?.extract() {
            MlsMessageBodyIn::PublicMessage(m) => ProtocolMessage::from(m),
            _ => {
                return Err(E2eeError::Refused(
                    "a commit must be an MLS public message".into(),
                ));
            }
        };
        if pm.group_id() != group.group_id() {
            return Err(E2eeError::Refused("a commit for another group".into()));
        }
        if pm.epoch() != group.group_context().epoch() {
            return Err(E2eeError::WrongEpoch);
        }
        if pm.content_type() != ContentType::Commit {
            return Err(E2eeError::Refused("not a commit".into()));
        }
        let processed = group
            .process_message(&crypto, pm)
            .map_err(|e| E2eeError::Refused(format!("invalid commit: {e:?}")))?;
        let sender = processed.sender().clone();
        let committer_cred = processed.credential().clone();
        let staged = match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(s) => s,
            _ => return Err(E2eeError::Refused("not a commit".into())),
        };
        let committer = parse_identity(&committer_cred)
            .ok_or_else(|| E2eeError::Refused("the committer has no Conclave identity".into()))?;
        if committer.0 != author {
            return Err(E2eeError::Refused(format!(
                "the commit is signed by {}, not by you",
                committer.0
            )));
        }
        let external = matches!(sender, Sender::NewMemberCommit);
        if !matches!(sender, Sender::Member(_) | Sender::NewMemberCommit) {
            return Err(E2eeError::Refused("unexpected commit sender".into()));
        }
        for p in staged.queued_proposals() {
            match p.proposal() {
                Proposal::Add(_) | Proposal::Update(_) | Proposal::Remove(_) => {}
                Proposal::ExternalInit(_) if external => {}
                other => {
                    return Err(E2eeError::Refused(format!(
                        "proposals of type {:?} are not allowed",
                        other.proposal_type()
                    )));
                }
            }
        }
        let mut added: Vec<(String, String)> = Vec::new();
        for add in staged.add_proposals() {
            let who = parse_identity(add.add_proposal().key_package().leaf_node().credential())
                .ok_or_else(|| {
                    E2eeError::Refused("an added device has no Conclave identity".into())
                })?;
            added.push(who);
        }
        if external {
            if !added.is_empty() {
                return Err(E2eeError::Refused(
                    "an external commit may add only the joiner".into(),
                ));
            }
            added.push(committer.clone());
        }
        let mut removed = Vec::new();
        for rm in staged.remove_proposals() {
            let leaf = rm.remove_proposal().removed();
            let who = group
                .leaf(leaf)
                .and_then(|l| parse_identity(l.credential()))
                .ok_or_else(|| E2eeError::Refused("a removal of an empty leaf".into()))?;
            let by_server =
                matches!(rm.sender(), Sender::External(i) if *i == SenderExtensionIndex::new(0));
            if !by_server && who.0 != committer.0 {
                return Err(E2eeError::Refused(format!(
                    "members cannot remove {}: removals come from the server (kick, ban, part)",
                    who.0
                )));
            }
            removed.push(who);
        }
        let epoch = staged.group_context().epoch().as_u64();
        let mut group = group;
        group
            .merge_commit(&next.storage, *staged)
            .map_err(E2eeError::mls)?;
        Ok(Validated {
            change: Change {
                epoch,
                committer,
                external,
                added,
                removed,
            },
            next,
        })
    }

    /// Signed Remove proposals for every device of `user` in the group, at the current epoch;
    /// also queued in the server's own state, so that a commit of them validates.
    pub fn remove_proposals(
        &mut self,
        signer: &ServerSigner,
        user: &str,
    ) -> Result<Vec<Vec<u8>>, E2eeError> {
        self.proposals_removing(signer, |u, _| u == user)
    }

    /// Signed Remove proposals for the leaves of one device (`user`'s `device`): a device
    /// removed from its account, while the account stays in the conversation. Queued like
    /// [`GroupState::remove_proposals`].
    pub fn remove_device_proposals(
        &mut self,
        signer: &ServerSigner,
        user: &str,
        device: &str,
    ) -> Result<Vec<Vec<u8>>, E2eeError> {
        self.proposals_removing(signer, |u, d| u == user && d == device)
    }

    fn proposals_removing(
        &mut self,
        signer: &ServerSigner,
        which: impl Fn(&str, &str) -> bool,
    ) -> Result<Vec<Vec<u8>>, E2eeError> {
        let crypto = RustCrypto::default();
        let mut group = self.group()?;
        let epoch = group.group_context().epoch();
        let leaves: Vec<LeafNodeIndex> = group
            .members()
            .filter(|m| parse_identity(&m.credential).is_some_and(|(u, d)| which(&u, &d)))
            .map(|m| m.index)
            .collect();
        let mut out = Vec::with_capacity(leaves.len());
        for leaf in leaves {
            let msg = ExternalProposal::new_remove::<DsProvider<'_>>(
                leaf,
                self.group_id.clone(),
                epoch,
                &signer.0,
                SenderExtensionIndex::new(0),
            )
            .map_err(E2eeError::mls)?;
            let bytes = msg.tls_serialize_detached().map_err(E2eeError::mls)?;
            let pm = parse_message(&bytes)?
                .try_into_protocol_message()
                .map_err(|e| E2eeError::Malformed(format!("{e:?}")))?;
            let processed = group.process_message(&crypto, pm).map_err(E2eeError::mls)?;
            if let ProcessedMessageContent::ProposalMessage(q) = processed.into_content() {
                group
                    .add_proposal(&self.storage, *q)
                    .map_err(E2eeError::mls)?;
            }
            out.push(bytes);
        }
        Ok(out)
    }

    /// Checks that an application message is for this group, at an epoch no older than
    /// `min_epoch` (the epoch of the last removal) and not ahead of `current` (the group's
    /// epoch, which the caller keeps: reading it here would decode the whole group).
    pub fn check_app(&self, bytes: &[u8], min_epoch: u64, current: u64) -> Result<(), E2eeError> {
        let (gid, epoch) = crate::app_message_header(bytes)?;
        if gid != self.group_id.as_slice() {
            return Err(E2eeError::Refused("a message for another group".into()));
        }
        if epoch < min_epoch || epoch > current {
            return Err(E2eeError::WrongEpoch);
        }
        Ok(())
    }

    /// Whether a GroupInfo is this group's at `epoch` (what external joiners are given).
    pub fn check_group_info(&self, group_info: &[u8], epoch: u64) -> Result<(), E2eeError> {
        let gi = crate::parse_group_info(group_info)?;
        if gi.group_id().as_slice() != self.group_id.as_slice() || gi.epoch().as_u64() != epoch {
            return Err(E2eeError::Refused(
                "the GroupInfo is not this group's at the commit's epoch".into(),
            ));
        }
        if gi.extensions().ratchet_tree().is_none() || gi.extensions().external_pub().is_none() {
            return Err(E2eeError::Refused(
                "the GroupInfo needs its ratchet tree and external public key".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a device's key package: valid signatures and lifetime, Conclave's ciphersuite, and a
/// credential naming `user`. Returns the device id it names and its signature key.
pub fn check_key_package(bytes: &[u8], user: &str) -> Result<(String, Vec<u8>), E2eeError> {
    let crypto = RustCrypto::default();
    let kp = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| E2eeError::Malformed(e.to_string()))?
        .validate(&crypto, ProtocolVersion::Mls10)
        .map_err(|e| E2eeError::Refused(format!("invalid key package: {e:?}")))?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(E2eeError::Refused(
            "key packages must use Conclave's ciphersuite".into(),
        ));
    }
    let (u, device) = parse_identity(kp.leaf_node().credential())
        .ok_or_else(|| E2eeError::Refused("the key package has no Conclave identity".into()))?;
    if u != user {
        return Err(E2eeError::Refused(format!(
            "a key package of {u} cannot be published by {user}"
        )));
    }
    Ok((device, kp.leaf_node().signature_key().as_slice().to_vec()))
}
