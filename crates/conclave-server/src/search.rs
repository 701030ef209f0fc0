//! Searching sealed history without storing plaintext: a keyed blind index.
//!
//! Each word of a text message is normalised (Unicode NFKD, accents removed, lower case) and
//! replaced by the first 8 bytes of HMAC-SHA256 under a search key derived from the data key.
//! The index holds only those 64-bit tokens (as 16 hex digits) for each message's global
//! sequence number, in a contentless SQLite FTS5 table: FTS5 never sees a word, only tokens,
//! and its segment merging keeps index writes cheap (a b-tree keyed by token would dirty one
//! random page per word per commit). A query computes the same tokens, finds the messages that have all of them, then opens
//! each candidate and checks the words really are there (which also removes the rare false
//! match of a truncated token).
//!
//! What the index reveals to someone holding the database file but not the key: for each
//! message, how many distinct words it has, and which messages share a word (equal tokens), so
//! word frequencies can be counted and messages grouped by common words. It reveals no word
//! itself: tokens cannot be computed or reversed without the key, so a guess cannot be checked.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Longest word indexed or searched, in characters; longer words are cut to this.
pub const MAX_WORD_CHARS: usize = 64;
/// Most distinct words indexed per message.
pub const MAX_WORDS_PER_MESSAGE: usize = 1024;
/// Most words in one query.
pub const MAX_QUERY_WORDS: usize = 16;
/// Longest query, in bytes.
pub const MAX_QUERY_BYTES: usize = 512;
/// Length of an index token as stored: 16 hex digits.
pub const TOKEN_TEXT_LEN: usize = 16;

/// The distinct normalised words of `text`, in first-seen order.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for_each_word(text, |w| out.push(w.to_string()));
    out
}

/// Calls `f` with each distinct normalised word of `text` (what [`words`] returns), in
/// first-seen order, without an allocation per word: every message's text goes through this
/// once for its index tokens (docs/benchmarks.md, "Fan-out of a group commit's run as one
/// buffer", found it a few percent of a busy room's server time as one `String` per word).
pub fn for_each_word(text: &str, mut f: impl FnMut(&str)) {
    // ASCII is its own NFKD form, has no combining marks, and lowercases to ASCII: the fast
    // path gives the same words without the Unicode machinery (most chat text is ASCII).
    let folded: String = if text.is_ascii() {
        text.to_ascii_lowercase()
    } else {
        text.nfkd()
            .filter(|c| !is_combining_mark(*c))
            .flat_map(char::to_lowercase)
            .collect()
    };
    let mut seen: Vec<&str> = Vec::new();
    for w in folded.split(|c: char| !c.is_alphanumeric()) {
        if w.is_empty() {
            continue;
        }
        let w = match w.char_indices().nth(MAX_WORD_CHARS) {
            Some((cut, _)) => &w[..cut],
            None => w,
        };
        if !seen.contains(&w) {
            seen.push(w);
            f(w);
            if seen.len() >= MAX_WORDS_PER_MESSAGE {
                break;
            }
        }
    }
}

/// Whether `text` contains every word of `query_words` (both normalised by [`words`]).
pub fn matches_all(text: &str, query_words: &[String]) -> bool {
    let have = words(text);
    query_words.iter().all(|q| have.contains(q))
}

/// The key that turns words into index tokens.
#[derive(Clone)]
pub struct SearchKey {
    mac: Hmac<Sha256>,
}

impl SearchKey {
    /// A search key from 32 bytes of key material (derived from the data key).
    pub fn new(key: &[u8; 32]) -> SearchKey {
        // HMAC accepts keys of any length; this cannot fail.
        let mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        SearchKey { mac }
    }

    /// The index tokens of `text`'s words, as stored in SQLite's index: each one's 16 hex
    /// digits, separated by spaces; `None` when the text has no word.
    pub fn tokens_text(&self, text: &str) -> Option<String> {
        // Room for eight tokens (most chat lines) before it grows.
        let mut tokens = String::with_capacity(8 * (TOKEN_TEXT_LEN + 1));
        for_each_word(text, |w| {
            if !tokens.is_empty() {
                tokens.push(' ');
            }
            self.push_token_text(w, &mut tokens);
        });
        (!tokens.is_empty()).then_some(tokens)
    }

    /// The index token of one normalised word, as the 16 hex digits stored in the index.
    pub fn token_text(&self, word: &str) -> String {
        let mut out = String::with_capacity(TOKEN_TEXT_LEN);
        self.push_token_text(word, &mut out);
        out
    }

    /// Appends [`SearchKey::token_text`] of `word` to `out`.
    pub fn push_token_text(&self, word: &str, out: &mut String) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let token = self.token(word) as u64;
        for i in (0..TOKEN_TEXT_LEN).rev() {
            out.push(char::from(HEX[((token >> (i * 4)) & 0xf) as usize]));
        }
    }

    /// The index token of one normalised word.
    pub fn token(&self, word: &str) -> i64 {
        let mut mac = self.mac.clone();
        mac.update(b"conclave-search-v1:");
        mac.update(word.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out[..8]);
        i64::from_be_bytes(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_accents_and_punctuation() {
        assert_eq!(
            words("Déploiement, DEPLOY! déploiement"),
            vec!["deploiement", "deploy"]
        );
        assert_eq!(words("Ｆｕｌｌwidth café"), vec!["fullwidth", "cafe"]);
        assert!(words("  ...  ").is_empty());
        assert!(matches_all("We deploy at FIVE", &words("five deploy")));
        assert!(!matches_all("We deploy at five", &words("deploy six")));
    }

    #[test]
    fn the_ascii_fast_path_agrees_with_the_unicode_path() {
        let slow = |text: &str| -> String {
            text.nfkd()
                .filter(|c| !is_combining_mark(*c))
                .flat_map(char::to_lowercase)
                .collect()
        };
        let every_ascii: String = (0u8..128).map(char::from).collect();
        assert_eq!(every_ascii.to_ascii_lowercase(), slow(&every_ascii));
        assert_eq!(
            words("Deploy the BUILD_42 at 5pm: deploy-now, ok?"),
            vec!["deploy", "the", "build", "42", "at", "5pm", "now", "ok"]
        );
    }

    #[test]
    fn long_words_are_cut_and_counted_once_by_their_cut() {
        let long = "é".repeat(MAX_WORD_CHARS + 5);
        let cut = "e".repeat(MAX_WORD_CHARS);
        assert_eq!(
            words(&format!("{long} {cut} x")),
            vec![cut.clone(), "x".into()]
        );
        let ascii = "a".repeat(MAX_WORD_CHARS + 1);
        assert_eq!(words(&ascii), vec!["a".repeat(MAX_WORD_CHARS)]);
        let many: String = (0..MAX_WORDS_PER_MESSAGE + 10)
            .map(|i| format!("w{i} "))
            .collect();
        assert_eq!(words(&many).len(), MAX_WORDS_PER_MESSAGE);
    }

    #[test]
    fn tokens_text_is_each_words_token_once_in_order() {
        let k = SearchKey::new(&[3; 32]);
        let text = "Deploy the build, deploy NOW";
        let expected: Vec<String> = words(text).iter().map(|w| k.token_text(w)).collect();
        assert_eq!(k.tokens_text(text), Some(expected.join(" ")));
        assert_eq!(k.tokens_text(" ... "), None);
    }

    #[test]
    fn tokens_depend_on_the_key() {
        let a = SearchKey::new(&[1; 32]);
        let b = SearchKey::new(&[2; 32]);
        assert_eq!(a.token("deploy"), a.token("deploy"));
        assert_ne!(a.token("deploy"), b.token("deploy"));
        assert_ne!(a.token("deploy"), a.token("deplay"));
    }

    #[test]
    fn token_text_is_the_tokens_16_hex_digits() {
        let k = SearchKey::new(&[1; 32]);
        for w in ["deploy", "a", "", "ünïcode"] {
            assert_eq!(k.token_text(w), format!("{:016x}", k.token(w) as u64));
        }
    }
}
