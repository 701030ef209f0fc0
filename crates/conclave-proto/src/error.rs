//! Typed error codes with a human sentence.

use serde::{Deserialize, Serialize};

/// What went wrong with a request, as a stable machine-readable code. The JSON client prints
/// [`ErrorCode::as_str`]; scripts match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed or a field is out of range.
    BadRequest,
    /// The request needs a logged-in session.
    NotLoggedIn,
    /// Already logged in on this connection.
    AlreadyLoggedIn,
    /// Wrong user name or password (never says which).
    AuthFailed,
    /// The server password is missing or wrong.
    ServerPassword,
    /// Registration is closed on this server.
    RegistrationClosed,
    /// Registration needs a valid invite code.
    InviteRequired,
    /// The account name is taken.
    NameTaken,
    /// A user or room name breaks the naming rules.
    InvalidName,
    /// The room does not exist or the caller may not see it.
    NoSuchRoom,
    /// One or more named users do not exist.
    NoSuchUser,
    /// The caller is not a member of the room.
    NotMember,
    /// The caller is not allowed to do this.
    Forbidden,
    /// A room of that name exists already.
    RoomExists,
    /// The room's password is missing or wrong.
    RoomPassword,
    /// Something is larger than the server allows.
    TooLarge,
    /// Too many requests; slow down.
    RateLimited,
    /// The server does not support this (yet).
    Unsupported,
    /// The server is shutting down.
    ShuttingDown,
    /// The server failed internally; the request may be retried.
    Internal,
    /// Nothing matched (a conversation with no messages, an unknown id).
    NotFound,
    /// Storing this would take the user over their file quota.
    QuotaExceeded,
    /// The file has expired and was deleted.
    Expired,
    /// The file is not (yet) complete on the server.
    NotReady,
    /// The caller declined this file.
    Declined,
    /// End-to-end encryption: the message or commit is for an epoch that is not the group's
    /// current one (another commit came first). Process the conversation and try again.
    StaleEpoch,
    /// The conversation is end-to-end encrypted: send MLS messages, not plain bodies.
    E2eeRequired,
    /// The server's disk is full: nothing new can be stored until the operator frees space.
    /// Reading, live presence and everything already stored keep working; retry later.
    StorageFull,
}

impl ErrorCode {
    /// The stable snake_case name used by the JSON client.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotLoggedIn => "not_logged_in",
            ErrorCode::AlreadyLoggedIn => "already_logged_in",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::ServerPassword => "server_password",
            ErrorCode::RegistrationClosed => "registration_closed",
            ErrorCode::InviteRequired => "invite_required",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::NoSuchRoom => "no_such_room",
            ErrorCode::NoSuchUser => "no_such_user",
            ErrorCode::NotMember => "not_member",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RoomExists => "room_exists",
            ErrorCode::RoomPassword => "room_password",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Expired => "expired",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Declined => "declined",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::E2eeRequired => "e2ee_required",
            ErrorCode::StorageFull => "storage_full",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: a code for machines, a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}
