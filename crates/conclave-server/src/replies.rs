//! Replies to requests the store could not serve: the disk is full, the server is stopping,
//! or a storage error (logged; the request fails, the server goes on).

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
