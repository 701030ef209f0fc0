//! Naming rules for accounts and rooms, shared by the server (which enforces them) and clients
//! (which can check early).
//!
//! Names are case-insensitive: they are folded to lower case, and the folded form is the one
//! stored and shown. Allowed: 1 to [`MAX_NAME_CHARS`] ASCII letters, digits, `_`, `-` and `.`,
//! starting with a letter or digit. A room name may be written with a leading `#`, which is
//! dropped.

/// Longest account or room name, in characters.
pub const MAX_NAME_CHARS: usize = 32;

/// Names the server itself uses in events (`by` of kicks and bans, `from` of announcements),
/// so no account may take them.
pub const RESERVED_ACCOUNT_NAMES: &[&str] = &["operator", "server", "vote"];

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name cannot be empty")]
    Empty,
    #[error("a name is at most {MAX_NAME_CHARS} characters")]
    TooLong,
    #[error("a name must start with a letter or digit")]
    BadStart,
    #[error("a name may contain only letters a-z, digits, '_', '-' and '.' (found {0:?})")]
    BadChar(char),
    #[error("{0:?} is reserved for the server; choose another name")]
    Reserved(String),
}

/// Checks a name and returns its canonical (lower-case) form.
pub fn canonical(name: &str) -> Result<String, NameError> {
    let name = name.trim();
    let first = name.chars().next().ok_or(NameError::Empty)?;
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(NameError::TooLong);
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadStart);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(NameError::BadChar(c));
    }
    Ok(name.to_ascii_lowercase())
}

/// Like [`canonical`], for a new account: also refuses the reserved names.
pub fn canonical_new_account(name: &str) -> Result<String, NameError> {
    let c = canonical(name)?;
    if RESERVED_ACCOUNT_NAMES.contains(&c.as_str()) {
        return Err(NameError::Reserved(c));
    }
    Ok(c)
}

/// Like [`canonical`], for room names (a leading `#` is allowed and dropped).
pub fn canonical_room(name: &str) -> Result<String, NameError> {
    let name = name.trim();
    canonical(name.strip_prefix('#').unwrap_or(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_case_and_checks_characters() {
        assert_eq!(canonical("Alice"), Ok("alice".into()));
        assert_eq!(canonical("a.b-c_9"), Ok("a.b-c_9".into()));
        assert_eq!(canonical(""), Err(NameError::Empty));
        assert_eq!(canonical("-x"), Err(NameError::BadStart));
        assert_eq!(canonical("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(canonical("é"), Err(NameError::BadStart));
        assert_eq!(canonical(&"a".repeat(33)), Err(NameError::TooLong));
        assert_eq!(canonical_room("#General"), Ok("general".into()));
        assert_eq!(
            canonical_new_account("Operator"),
            Err(NameError::Reserved("operator".into()))
        );
        assert_eq!(canonical_new_account("alice"), Ok("alice".into()));
    }
}
