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

use crate::store::StoreError;

/// The answer to a write refused because the disk is full.
pub fn storage_full() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::StorageFull,
        "the server's disk is full: nothing new can be stored right now (reading still works); \
         try again later, the operator has been told",
    )
}

/// A store failure as a reply: the request failed, the server goes on.
pub fn store_error(e: StoreError) -> ErrorBody {
    match e {
        StoreError::Stopped => ErrorBody::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down; try again after it restarts",
        ),
        e if e.disk_full() => storage_full(),
        other => {
            tracing::error!(error = %other, "store error");
            ErrorBody::new(
                ErrorCode::Internal,
                "the server could not complete this because of a storage error; try again",
            )
        }
    }
}

/// Runs password hashing (Argon2id: CPU-heavy, 19 MiB each) off the async threads, at most
/// one per core at a time. Unbounded, a burst of logins would start hundreds of blocking
/// threads holding 19 MiB each (and a login flood would take the whole machine).
pub async fn hashing<R: Send + 'static>(
    shared: &crate::server::Shared,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, ErrorBody> {
    let internal = || ErrorBody::new(ErrorCode::Internal, "internal error; try again");
    let _permit = shared.hashing.acquire().await.map_err(|_| internal())?;
    tokio::task::spawn_blocking(f).await.map_err(|_| internal())
}
