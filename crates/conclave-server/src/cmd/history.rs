//! History pages, search, and acknowledgements of what was received.

use conclave_proto::{ConvRef, Cursor, ErrorBody, ErrorCode, Reply};

use super::store_error;
use crate::conn::Conn;
use crate::search;

/// A page size must be between 1 and the configured maximum.
fn check_limit(conn: &Conn, limit: u32) -> Result<(), ErrorBody> {
    let max = conn.shared.config().limits.max_history_page;
    if limit == 0 || limit > max {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("limit must be between 1 and {max}"),
        ));
    }
    Ok(())
}

pub async fn history(
    conn: &Conn,
    user: &str,
    conv: ConvRef,
    limit: u32,
    before: Option<u64>,
) -> Result<Reply, ErrorBody> {
    check_limit(conn, limit)?;
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

pub async fn search(
    conn: &Conn,
    user: &str,
    query: String,
    room: Option<String>,
    limit: u32,
    before: Option<String>,
) -> Result<Reply, ErrorBody> {
    check_limit(conn, limit)?;
    if query.len() > search::MAX_QUERY_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "a search query is at most {} bytes",
                search::MAX_QUERY_BYTES
            ),
        ));
    }
    let words = search::words(&query);
    if words.is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "the search query has no words; give at least one word to look for",
        ));
    }
    if words.len() > search::MAX_QUERY_WORDS {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "a search query has at most {} words",
                search::MAX_QUERY_WORDS
            ),
        ));
    }
    let (rooms, direct) = {
        let hub = conn.shared.hub.lock();
        match &room {
            Some(r) => match hub.check_history(user, &ConvRef::Room(r.clone()))? {
                conclave_proto::Conv::Room(name) => (vec![name], false),
                conclave_proto::Conv::Direct(_) => (Vec::new(), false),
            },
            None => (hub.rooms_of(user), true),
        }
    };
    let viewer = user.to_string();
    let _timer = conn.shared.metrics.search_timer();
    let results = conn
        .shared
        .store
        .call(move |db| db.search(&viewer, &rooms, direct, &words, before.as_deref(), limit))
        .await
        .map_err(store_error)?;
    Ok(Reply::Results(results))
}

pub async fn ack(conn: &Conn, user: &str, cursors: Vec<Cursor>) -> Result<Reply, ErrorBody> {
    let max = conn.shared.config().limits.max_cursors;
    if cursors.len() > max {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!("at most {max} cursors in one ack"),
        ));
    }
    let user = user.to_string();
    let cursors: Vec<_> = cursors.into_iter().map(|c| (c.conv, c.seq)).collect();
    conn.shared
        .store
        .call(move |db| db.ack(&user, &cursors))
        .await
        .map_err(store_error)?;
    Ok(Reply::Ok)
}
