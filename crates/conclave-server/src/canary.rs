//! Canary messages: proof that message text is not stored in plaintext.
//!
//! `conclave doctor` asks a running server (admin socket, `{"cmd":"canary"}`) to store a
//! message whose text is [`PREFIX`] and random hex, through the same sealing path as every
//! message, committed and synced before the answer. It then scans the database, its WAL, the
//! file store and the audit log for that text, and for [`PREFIX`] (which also finds canaries
//! planted by earlier runs). Finding either means plaintext reached the disk.
//!
//! Canaries live in a direct conversation of the account name [`CONVERSATION`], which no
//! account can have (it is one of the server's own names), so nobody receives or sees them;
//! retention expires them like any message.

use conclave_proto::{Body, Conv, ErrorBody};
use rand::RngCore;

use crate::cmd::store_error;
use crate::state::Shared;
use crate::store::NewMessage;

/// Every canary's text starts with this. A colon keeps it out of every name (names cannot
/// contain one), so only message text could hold it.
pub const PREFIX: &str = "conclave-canary:";
/// The (reserved) account whose direct conversation holds the canaries.
pub const CONVERSATION: &str = "server";

/// A new canary text: [`PREFIX`] and 32 random hex digits.
pub fn new_text() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

/// Stores a canary message durably and returns its text.
pub async fn plant(shared: &Shared) -> Result<String, ErrorBody> {
    let text = new_text();
    let msg = NewMessage {
        conv: Conv::Direct(vec![CONVERSATION.to_string()]),
        from: CONVERSATION.to_string(),
        body: Body::text(text.clone()),
        except: Vec::new(),
        idempotency_key: None,
        refs: None,
    };
    shared
        .store
        .call(move |db| db.append_batch(&[msg]).map(|_| ()))
        .await
        .map_err(store_error)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_texts_are_unique_and_cannot_be_names() {
        let a = new_text();
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + 32);
        assert_ne!(a, new_text());
        assert!(conclave_proto::names::canonical(&a).is_err());
        assert!(conclave_proto::names::canonical_room(&a).is_err());
    }
}
