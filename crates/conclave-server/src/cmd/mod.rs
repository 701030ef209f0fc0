//! One module per kind of request. Each handler checks with the hub, writes through to the
//! store, applies the change to the hub, and tells whoever it concerns.

pub mod admin;
pub mod auth;
pub mod history;
pub mod moderation;
pub mod rooms;
pub mod send;

use conclave_proto::{ErrorBody, ErrorCode};

use crate::store::StoreError;

/// A store failure as a reply: the request failed, the server goes on.
pub fn store_error(e: StoreError) -> ErrorBody {
    match e {
        StoreError::Stopped => ErrorBody::new(
            ErrorCode::ShuttingDown,
            "the server is shutting down; try again after it restarts",
        ),
        other => {
            tracing::error!(error = %other, "store error");
            ErrorBody::new(
                ErrorCode::Internal,
                "the server could not complete this because of a storage error; try again",
            )
        }
    }
}

/// Runs CPU-heavy work (password hashing) off the async threads.
pub async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, ErrorBody> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ErrorBody::new(ErrorCode::Internal, "internal error; try again"))
}
