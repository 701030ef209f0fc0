//! History pages.

use conclave_proto::{ConvRef, ErrorBody, ErrorCode, Reply};

use super::store_error;
use crate::session::Conn;

pub async fn history(
    conn: &Conn,
    user: &str,
    conv: ConvRef,
    limit: u32,
    before: Option<u64>,
) -> Result<Reply, ErrorBody> {
    let max = conn.shared.config.limits.max_history_page;
    if limit == 0 || limit > max {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("limit must be between 1 and {max}"),
        ));
    }
    let conv = conn.shared.hub.lock().check_history(user, &conv)?;
    let viewer = user.to_string();
    let messages = conn
        .shared
        .store
        .call(move |db| db.history(&conv, &viewer, before, limit))
        .await
        .map_err(store_error)?;
    Ok(Reply::Messages(messages))
}
