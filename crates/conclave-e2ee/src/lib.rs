//! End-to-end encryption for Conclave on MLS (RFC 9420), with OpenMLS.
//!
//! Two halves that share the wire conventions:
//! - [`device::Device`]: one client device's MLS state (its signature key, key packages,
//!   groups, and the decrypted history it keeps), in one SQLite file, every group operation
//!   one SQLite transaction.
//! - [`ds`]: what the server (the delivery and authentication service) does with MLS: it
//!   keeps each conversation's public group state, validates every commit before it is
//!   ordered, checks key packages and application messages' epochs, and signs the Remove
//!   proposals of kicks and bans as the group's external sender.
//!
//! The server never holds a group's secrets: it sees handshake messages in the public-message
//! wire format (so it can validate them) and application messages only as ciphertext.

pub mod backup;
pub mod codec;
pub mod device;
pub mod ds;
pub mod file_crypt;
mod history;
pub mod payload;
pub mod transfer;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;

/// The one ciphersuite Conclave uses.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Body content type of an MLS application message (a `PrivateMessage`).
pub const CT_APP: &str = "application/mls-app";
/// Body content type of a commit the server validated and ordered (a `PublicMessage`).
pub const CT_COMMIT: &str = "application/mls-commit";
/// Body content type of a proposal the server made as external sender (a `PublicMessage`).
pub const CT_PROPOSAL: &str = "application/mls-proposal";

/// The identity the server signs its proposals with.
pub const SERVER_IDENTITY: &[u8] = b"conclave-server";

/// Past epochs whose keys a member keeps, for messages that arrive after a commit.
pub const MAX_PAST_EPOCHS: usize = 5;
/// How far out of order application messages of one sender may arrive.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 20;
/// How far ahead of the expected generation a message may be.
pub const MAX_FORWARD_DISTANCE: u32 = 1000;
/// Application messages are padded to a multiple of this many bytes, to hide lengths.
pub const PADDING: usize = 256;

/// The credential identity of one device of an account: `user` and the device id, joined by
/// a slash (user names cannot contain one).
pub fn identity(user: &str, device: &str) -> Vec<u8> {
    format!("{user}/{device}").into_bytes()
}

/// The (user, device) of a basic credential made by [`identity`].
pub fn parse_identity(credential: &Credential) -> Option<(String, String)> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let text = std::str::from_utf8(basic.identity()).ok()?;
    let (user, device) = text.split_once('/')?;
    if user.is_empty() || device.is_empty() || device.contains('/') {
        return None;
    }
    Some((user.to_string(), device.to_string()))
}

/// A short, human-comparable fingerprint of a device's signature key (a "safety number"):
/// the first 16 bytes of its SHA-256, as four groups of eight hex digits.
pub fn key_fingerprint(signature_key: &[u8]) -> String {
    use openmls_traits::crypto::OpenMlsCrypto;
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let digest = crypto
        .hash(HashType::Sha2_256, signature_key)
        .unwrap_or_default();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    hex.as_bytes()
        .chunks(8)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Errors of MLS operations, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum E2eeError {
    #[error("the end-to-end state database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("not a valid MLS message: {0}")]
    Malformed(String),
    #[error("this device is not a member of that conversation's group")]
    NoGroup,
    #[error("the message is for another epoch of the group (it is stale or from the future)")]
    WrongEpoch,
    #[error("MLS: {0}")]
    Mls(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the local history key does not open this state directory: wrong password?")]
    WrongKey,
}

impl E2eeError {
    pub(crate) fn mls(e: impl std::fmt::Debug) -> Self {
        E2eeError::Mls(format!("{e:?}"))
    }
}

/// Serialises an outgoing MLS message.
pub(crate) fn out_bytes(m: &MlsMessageOut) -> Result<Vec<u8>, E2eeError> {
    m.tls_serialize_detached().map_err(E2eeError::mls)
}

/// Parses an incoming MLS message.
pub fn parse_message(bytes: &[u8]) -> Result<MlsMessageIn, E2eeError> {
    MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| E2eeError::Malformed(e.to_string()))
}

/// Parses a GroupInfo message.
pub fn parse_group_info(
    bytes: &[u8],
) -> Result<openmls::messages::group_info::VerifiableGroupInfo, E2eeError> {
    match parse_message(bytes)?.extract() {
        MlsMessageBodyIn::GroupInfo(gi) => Ok(gi),
        _ => Err(E2eeError::Malformed("not a GroupInfo".into())),
    }
}

/// The group id and epoch an application message claims (readable without its keys).
pub fn app_message_header(bytes: &[u8]) -> Result<(Vec<u8>, u64), E2eeError> {
    match parse_message(bytes)?.extract() {
        MlsMessageBodyIn::PrivateMessage(m) => {
            let pm = ProtocolMessage::from(m);
            Ok((pm.group_id().as_slice().to_vec(), pm.epoch().as_u64()))
        }
        _ => Err(E2eeError::Malformed(
            "an application message must be an MLS private message".into(),
        )),
    }
}
