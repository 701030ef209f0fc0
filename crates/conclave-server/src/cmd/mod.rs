//! One module per kind of request. Each handler checks with the hub, writes through to the
//! store, applies the change to the hub, and tells whoever it concerns.

pub mod admin;
pub mod auth;
pub mod chat;
pub mod devices;
pub mod e2ee;
pub mod files;
pub mod history;
pub mod moderation;
pub mod presence;
pub mod rooms;
pub mod send;

use conclave_proto::{ErrorBody, ErrorCode};

pub use crate::replies::{storage_full, store_error};

/// Runs password hashing (Argon2id: CPU-heavy, 19 MiB each) off the async threads, at most
/// one per core at a time. Unbounded, a burst of logins would start hundreds of blocking
/// threads holding 19 MiB each (and a login flood would take the whole machine).
pub async fn hashing<R: Send + 'static>(
    shared: &crate::state::Shared,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, ErrorBody> {
    let internal = || ErrorBody::new(ErrorCode::Internal, "internal error; try again");
    let _permit = shared.hashing.acquire().await.map_err(|_| internal())?;
    tokio::task::spawn_blocking(f).await.map_err(|_| internal())
}
