//! History pages, search, and acknowledgements of what was received.

use conclave_proto::{ConvRef, Cursor, ErrorBody, ErrorCode, MAX_PAGE_BYTES, Message, Reply};

use super::store_error;
use crate::search;
use crate::session::Conn;

/// What a message adds to a reply besides its body (ids, names, conversation, numbers), at most
/// for usual names; only used to keep pages under [`MAX_PAGE_BYTES`].
const MESSAGE_OVERHEAD_BYTES: usize = 256;

/// How many of `messages`, in the order given, fit in one reply: their bodies within
/// [`MAX_PAGE_BYTES`], and at least one.
fn fitting<'a>(messages: impl Iterator<Item = &'a Message>) -> usize {
    let mut bytes = 0usize;
    let mut n = 0usize;
    for m in messages {
        bytes += m.body.data.len() + m.body.content_type.len() + MESSAGE_OVERHEAD_BYTES;
        if n > 0 && bytes > MAX_PAGE_BYTES {
            break;
        }
        n += 1;
    }
    n
}

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
    // Oldest first: keep the newest that fit, so paging on from the first one leaves no gap.
    let mut messages = messages;
    let keep = fitting(messages.iter().rev());
    messages.drain(..messages.len() - keep);
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
    // Newest first: keep the newest that fit, so paging on from the last one leaves no gap.
    let mut results = results;
    results.truncate(fitting(results.iter()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::{Body, Conv};

    fn message(bytes: usize) -> Message {
        Message {
            msg_id: "m".into(),
            conv: Conv::Room("r".into()),
            from: "a".into(),
            seq: 1,
            ts_ms: 0,
            body: Body {
                content_type: String::new(),
                data: vec![0; bytes],
            },
        }
    }

    #[test]
    fn a_page_fits_its_budget_but_never_holds_nothing() {
        let small: Vec<Message> = (0..500).map(|_| message(100)).collect();
        assert_eq!(fitting(small.iter()), 500);
        let big: Vec<Message> = (0..100).map(|_| message(60_000)).collect();
        let n = fitting(big.iter());
        assert_eq!(n, MAX_PAGE_BYTES / (60_000 + MESSAGE_OVERHEAD_BYTES));
        let huge = [message(MAX_PAGE_BYTES * 2), message(10)];
        assert_eq!(fitting(huge.iter()), 1, "one message even over the budget");
        assert_eq!(fitting(std::iter::empty()), 0);
    }
}
