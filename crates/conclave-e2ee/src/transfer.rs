//! History for another device of the same account (issue 21): the rows of the local history
//! store, read page by page, sealed to the new device and signed by the one that approved it.
//!
//! The construction is the libraries', not ours: each chunk is sealed with HPKE (RFC 9180,
//! single shot, base mode, through OpenMLS's crypto provider with the ciphersuite's HPKE
//! configuration: X25519, HKDF-SHA256, AES-128-GCM) to the new device's transfer key, and the
//! sealed chunk is signed with the approving device's MLS signature key (Ed25519). The transfer
//! key is an HPKE key pair of the new device, signed with its MLS signature key, so the
//! approver knows it belongs to the device whose safety number it showed.
//!
//! Rows travel generically: (conversation, sequence, sender, time, the payload's encoding).
//! Whatever kind of payload the history store keeps (messages, file descriptions and keys,
//! and any later kind) moves without this module knowing it.

use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::signatures::Signer;
use openmls_traits::types::HpkeCiphertext;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::payload::Payload;
use crate::{CIPHERSUITE, E2eeError, key_fingerprint};

/// Most rows in one chunk.
pub const MAX_CHUNK_ROWS: usize = 500;
/// Most payload bytes in one chunk (a row is never split: one larger row makes its own chunk).
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

const TRANSFER_INFO: &[u8] = b"conclave-history-transfer-v1";
const TRANSFER_KEY_LABEL: &[u8] = b"conclave-transfer-key-v1|";
const CHUNK_LABEL: &[u8] = b"conclave-transfer-chunk-v1|";
const KEY_AD: &[u8] = b"conclave-transfer-private-v1";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS conclave_transfer_key (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    public  BLOB NOT NULL,
    private BLOB NOT NULL
);
";

/// One row of the local history, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub conv: String,
    pub seq: u64,
    pub sender: String,
    pub ts_ms: i64,
    /// The payload's encoding ([`Payload::encode`]).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The message's server id and its state (reply reference, edits, deletion, reactions),
    /// when the sending device knows them: the new device can then apply later acts to it,
    /// list its thread and show its reactions.
    pub state: Option<(String, crate::device::LocalState)>,
}

/// What a chunk holds once opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub rows: Vec<Row>,
    /// The last chunk of the transfer.
    pub last: bool,
    /// The rows were written after the transfer's snapshot (new ones, or ones an edit or a
    /// delete replaced while the transfer ran): they replace what the device holds for them,
    /// unless it read them itself.
    pub replaces: bool,
    /// The whole transfer's conversations and messages (meaningful in the last chunk).
    pub conversations: u32,
    pub messages: u64,
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    #[serde(with = "serde_bytes")]
    kem_output: Vec<u8>,
    #[serde(with = "serde_bytes")]
    ciphertext: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signer_key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

/// Where a chunk belongs: it opens only for this account, these two devices, this transfer
/// and this position.
pub struct ChunkId<'a> {
    pub user: &'a str,
    pub from_device: &'a str,
    pub to_device: &'a str,
    pub transfer: &'a str,
    pub index: u32,
}

impl ChunkId<'_> {
    fn aad(&self) -> Vec<u8> {
        format!(
            "{}|{}|{}|{}|{}",
            self.user, self.from_device, self.to_device, self.transfer, self.index
        )
        .into_bytes()
    }
}

/// A page of history read for a transfer: its rows and the position to read on from.
pub struct Page {
    pub rows: Vec<Row>,
    /// The last row's position (give it back as `after` for the next page); `None` when
    /// there was nothing more.
    pub next: Option<i64>,
}

/// Most rounds of rows written during a transfer that are sent after its snapshot (each
/// round takes what was written during the one before; a history that keeps changing faster
/// than it is sent stops there, and the device reads the rest as it comes).
pub const MAX_TAIL_ROUNDS: u32 = 8;

/// Reads a device's history for one transfer, a chunk at a time: first every row up to the
/// snapshot taken at the start, then the rows written since (a row an edit or a delete
/// replaces moves past the snapshot, so a replaced row is never lost: it comes again in its
/// current state, marked [`Chunk::replaces`]), then a last chunk with no rows and the totals.
/// Holds no more than one page.
#[derive(Debug)]
pub struct TransferCursor {
    after: i64,
    end: i64,
    tail: bool,
    rounds: u32,
    sent: u64,
    conversations: u32,
    messages: u64,
    done: bool,
}

impl TransferCursor {
    /// Takes the snapshot.
    pub fn start(d: &Device) -> Result<TransferCursor, E2eeError> {
        let end = d.history_end()?;
        let (conversations, messages) = d.history_counts(end)?;
        Ok(TransferCursor {
            after: 0,
            end,
            tail: false,
            rounds: 0,
            sent: 0,
            conversations,
            messages,
            done: false,
        })
    }

    /// Conversations and rows at the snapshot.
    pub fn totals(&self) -> (u32, u64) {
        (self.conversations, self.messages)
    }

    /// Rows handed out so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The next chunk; `None` after the last one.
    pub fn next_chunk(&mut self, d: &Device) -> Result<Option<Chunk>, E2eeError> {
        if self.done {
            return Ok(None);
        }
        loop {
            if self.after < self.end {
                let page = d.history_page(self.after, self.end)?;
                // Strictly forward: a page's position is past `after`.
                self.after = page.next.map_or(self.end, |n| n.max(self.after + 1));
                if page.rows.is_empty() {
                    continue;
                }
                self.sent += page.rows.len() as u64;
                return Ok(Some(Chunk {
                    rows: page.rows,
                    last: false,
                    replaces: self.tail,
                    conversations: self.conversations,
                    messages: self.messages,
                }));
            }
            let now = d.history_end()?;
            if now > self.end && self.rounds < MAX_TAIL_ROUNDS {
                self.rounds += 1;
                self.tail = true;
                self.end = now;
                continue;
            }
            self.done = true;
            let (conversations, _) = d.history_counts(self.end)?;
            return Ok(Some(Chunk {
                rows: Vec::new(),
                last: true,
                replaces: false,
                conversations,
                messages: self.sent,
            }));
        }
    }
}

/// Whether `signature` is `signature_key`'s signature over the transfer key `transfer_key`.
pub fn verify_transfer_key(signature_key: &[u8], transfer_key: &[u8], signature: &[u8]) -> bool {
    let mut signed = TRANSFER_KEY_LABEL.to_vec();
    signed.extend_from_slice(transfer_key);
    openmls_rust_crypto::RustCrypto::default()
        .verify_signature(
            CIPHERSUITE.signature_algorithm(),
            &signed,
            signature_key,
            signature,
        )
        .is_ok()
}

impl Device {
    fn transfer_schema(&self) -> Result<(), E2eeError> {
        self.conn.execute_batch(SCHEMA)?;
        Ok(())
    }

    /// Whether this device has made its transfer key (it asked for history before).
    pub fn has_transfer_key(&self) -> Result<bool, E2eeError> {
        self.transfer_schema()?;
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM conclave_transfer_key WHERE id = 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .is_some())
    }

    /// This device's transfer key (made once) and its signature by this device.
    pub fn transfer_key(&self) -> Result<(Vec<u8>, Vec<u8>), E2eeError> {
        self.transfer_schema()?;
        let public: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT public FROM conclave_transfer_key WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let public = match public {
            Some(p) => p,
            None => {
                let mut ikm = zeroize::Zeroizing::new([0u8; 32]);
                rand::Rng::fill(&mut rand::rng(), &mut ikm[..]);
                let pair = self
                    .crypto
                    .derive_hpke_keypair(CIPHERSUITE.hpke_config(), &ikm[..])
                    .map_err(E2eeError::mls)?;
                let sealed = self.history.seal(KEY_AD, &pair.private);
                self.conn.execute(
                    "INSERT INTO conclave_transfer_key (id, public, private) VALUES (1, ?1, ?2)",
                    params![pair.public, sealed],
                )?;
                pair.public
            }
        };
        let mut signed = TRANSFER_KEY_LABEL.to_vec();
        signed.extend_from_slice(&public);
        let signature = self.signer.sign(&signed).map_err(E2eeError::mls)?;
        Ok((public, signature))
    }

    /// The position of the newest row of the local history (0 when it is empty): a transfer
    /// takes the rows up to it.
    pub fn history_end(&self) -> Result<i64, E2eeError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(rowid), 0) FROM conclave_history",
            [],
            |r| r.get(0),
        )?)
    }

    /// How many conversations and rows the local history holds up to `end`.
    pub fn history_counts(&self, end: i64) -> Result<(u32, u64), E2eeError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(DISTINCT conv), COUNT(*) FROM conclave_history WHERE rowid <= ?1",
            [end],
            |r| Ok((r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// The rows after position `after` up to `end`, at most [`MAX_CHUNK_ROWS`] rows and
    /// about [`MAX_CHUNK_BYTES`] of payload. Rows sealed under an earlier password's key
    /// (unreadable here too) are left out.
    pub fn history_page(&self, after: i64, end: i64) -> Result<Page, E2eeError> {
        let mut st = self.conn.prepare(
            "SELECT rowid, conv, seq, sender, ts_ms, record FROM conclave_history
             WHERE rowid > ?1 AND rowid <= ?2 ORDER BY rowid LIMIT ?3",
        )?;
        let mut rows = st.query(params![after, end, MAX_CHUNK_ROWS as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = None;
        while let Some(r) = rows.next()? {
            let rowid: i64 = r.get(0)?;
            let conv: String = r.get(1)?;
            let seq: i64 = r.get(2)?;
            let record: Vec<u8> = r.get(5)?;
            next = Some(rowid);
            let ad = format!("conclave-local-v1|{conv}|{seq}");
            let Ok(payload) = self.history.open(ad.as_bytes(), &record) else {
                continue;
            };
            bytes += payload.len() + conv.len() + 32;
            let state = self.local_state(&conv, seq as u64)?;
            out.push(Row {
                state,
                conv,
                seq: seq as u64,
                sender: r.get(3)?,
                ts_ms: r.get(4)?,
                payload,
            });
            if bytes >= MAX_CHUNK_BYTES {
                break;
            }
        }
        Ok(Page { rows: out, next })
    }

    /// Seals a chunk to the transfer key of the device `id.to_device`, signed by this device.
    pub fn seal_chunk(
        &self,
        id: &ChunkId<'_>,
        transfer_key: &[u8],
        chunk: &Chunk,
    ) -> Result<Vec<u8>, E2eeError> {
        let plain = zeroize::Zeroizing::new(
            postcard::to_allocvec(chunk).map_err(|e| E2eeError::Malformed(e.to_string()))?,
        );
        let aad = id.aad();
        let ct = self
            .crypto
            .hpke_seal(
                CIPHERSUITE.hpke_config(),
                transfer_key,
                TRANSFER_INFO,
                &aad,
                &plain,
            )
            .map_err(E2eeError::mls)?;
        let kem_output = ct.kem_output.as_slice().to_vec();
        let ciphertext = ct.ciphertext.as_slice().to_vec();
        let signature = self
            .signer
            .sign(&chunk_signed(&aad, &kem_output, &ciphertext))
            .map_err(E2eeError::mls)?;
        postcard::to_allocvec(&Sealed {
            kem_output,
            ciphertext,
            signer_key: self.signer.public().to_vec(),
            signature,
        })
        .map_err(|e| E2eeError::Malformed(e.to_string()))
    }

    /// Opens a chunk sealed to this device: the chunk and the signing key (check that it is
    /// one of the account's devices; its fingerprint is the approver's safety number).
    pub fn open_chunk(&self, id: &ChunkId<'_>, data: &[u8]) -> Result<(Chunk, Vec<u8>), E2eeError> {
        self.transfer_schema()?;
        let sealed: Sealed = postcard::from_bytes(data)
            .map_err(|e| E2eeError::Malformed(format!("a history chunk: {e}")))?;
        let aad = id.aad();
        self.crypto
            .verify_signature(
                CIPHERSUITE.signature_algorithm(),
                &chunk_signed(&aad, &sealed.kem_output, &sealed.ciphertext),
                &sealed.signer_key,
                &sealed.signature,
            )
            .map_err(|_| E2eeError::Refused("a history chunk with a bad signature".into()))?;
        let private: Vec<u8> = self
            .conn
            .query_row(
                "SELECT private FROM conclave_transfer_key WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| E2eeError::Refused("this device has no transfer key".into()))?;
        let private = zeroize::Zeroizing::new(self.history.open(KEY_AD, &private)?);
        let ct = HpkeCiphertext {
            kem_output: sealed.kem_output.into(),
            ciphertext: sealed.ciphertext.into(),
        };
        let plain = zeroize::Zeroizing::new(
            self.crypto
                .hpke_open(
                    CIPHERSUITE.hpke_config(),
                    &ct,
                    &private,
                    TRANSFER_INFO,
                    &aad,
                )
                .map_err(|_| {
                    E2eeError::Refused("a history chunk that is not for this device".into())
                })?,
        );
        let chunk: Chunk = postcard::from_bytes(&plain)
            .map_err(|e| E2eeError::Malformed(format!("a history chunk: {e}")))?;
        Ok((chunk, sealed.signer_key))
    }

    /// Adds rows to the local history, in one transaction. Rows this device has already
    /// (it was there) are kept as they are; rows whose payload it cannot decode are skipped.
    /// Returns how many were added.
    pub fn import_rows(&self, rows: &[Row]) -> Result<u64, E2eeError> {
        self.tx(|d| {
            let mut added = 0u64;
            for row in rows {
                if !d.holds_row(row)? && d.write_row(row)? {
                    added += 1;
                }
            }
            Ok(added)
        })
    }

    /// Whether the local history has the row's place (conversation and sequence).
    fn holds_row(&self, row: &Row) -> Result<bool, E2eeError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM conclave_history WHERE conv = ?1 AND seq = ?2",
                params![row.conv, row.seq as i64],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .is_some())
    }

    /// Writes a row and its state; false (nothing written) when its payload does not decode.
    fn write_row(&self, row: &Row) -> Result<bool, E2eeError> {
        let Ok(payload) = Payload::decode(&row.payload) else {
            return Ok(false);
        };
        self.put_history(&row.conv, row.seq, &row.sender, row.ts_ms, &payload)?;
        if let Some((msg_id, state)) = &row.state {
            self.put_state(&row.conv, row.seq, msg_id, state)?;
        }
        Ok(true)
    }

    /// Adds rows of a [`Chunk::replaces`] chunk: each replaces the row this device holds for
    /// it (an earlier chunk's older version), except a row this device read itself (after it
    /// joined the conversation's group), which is already current here. Returns how many
    /// were written.
    pub fn import_replacements(&self, rows: &[Row]) -> Result<u64, E2eeError> {
        self.tx(|d| {
            let mut written = 0u64;
            for row in rows {
                let read_here =
                    d.joined_seq(&row.conv)?.is_some_and(|j| row.seq > j) && d.holds_row(row)?;
                if !read_here && d.write_row(row)? {
                    written += 1;
                }
            }
            Ok(written)
        })
    }
}

/// The safety number of the device that signed a chunk.
pub fn signer_fingerprint(signer_key: &[u8]) -> String {
    key_fingerprint(signer_key)
}

fn chunk_signed(aad: &[u8], kem_output: &[u8], ciphertext: &[u8]) -> Vec<u8> {
    let mut v = CHUNK_LABEL.to_vec();
    for part in [aad, kem_output, ciphertext] {
        v.extend_from_slice(&(part.len() as u64).to_be_bytes());
        v.extend_from_slice(part);
    }
    v
}
