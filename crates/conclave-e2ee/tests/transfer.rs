//! A history transfer while the history changes (issue 21): rows edited or deleted during a
//! running transfer arrive in their current state, whether their page was already sent or not,
//! and rows written meanwhile arrive too. Two real devices (SQLite files in temporary
//! directories); the chunks go from one to the other as the client moves them, without the
//! sealing (tested with the server in conclave-client's tests).

use conclave_e2ee::device::Device;
use conclave_e2ee::payload::{ACT_DELETE, ACT_EDIT, Payload};
use conclave_e2ee::transfer::{Row, TransferCursor};

const CONV: &str = "d:alice,bob";

fn row(seq: u64, text: &str) -> Row {
    Row {
        state: None,
        conv: CONV.into(),
        seq,
        sender: "alice".into(),
        ts_ms: 1_700_000_000_000 + seq as i64,
        payload: Payload::Body {
            content_type: "text/plain".into(),
            data: text.as_bytes().to_vec(),
        }
        .encode()
        .expect("encode"),
    }
}

/// Alice's device edits (or deletes) her message at `seq` with the act at `act_seq`, as
/// processing the conversation's log does.
fn act(d: &Device, seq: u64, act_seq: u64, kind: u8, text: &str) {
    let applied = d
        .apply_act(
            CONV,
            act_seq,
            "alice",
            1_700_000_100_000,
            &Payload::Act {
                msg_id: format!("m{seq}"),
                kind,
                content_type: "text/plain".into(),
                data: text.as_bytes().to_vec(),
            },
        )
        .expect("act");
    assert!(applied, "the act on {seq} applies");
}

fn texts(d: &Device) -> Vec<(u64, String, String)> {
    d.history(CONV, 10_000, None)
        .expect("history")
        .into_iter()
        .filter_map(|e| match e.payload {
            Payload::Body { content_type, data } => Some((
                e.seq,
                content_type,
                String::from_utf8_lossy(&data).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn rows_replaced_or_written_during_a_transfer_arrive_in_their_current_state() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let old = Device::open(dirs[0].path(), "alice", "pw").expect("old device");
    let new = Device::open(dirs[1].path(), "alice", "pw").expect("new device");
    let n = 1200u64;
    let rows: Vec<Row> = (1..=n).map(|i| row(i, &format!("text {i}"))).collect();
    old.import_rows(&rows).expect("seed");
    for seq in [10, 900, 1100] {
        old.note_message(CONV, seq, &format!("m{seq}"), None)
            .expect("ids");
    }

    let mut cursor = TransferCursor::start(&old).expect("snapshot");
    assert_eq!(cursor.totals(), (1, n));
    let take = |cursor: &mut TransferCursor| {
        let chunk = cursor.next_chunk(&old).expect("read").expect("a chunk");
        if chunk.replaces {
            new.import_replacements(&chunk.rows).expect("import");
        } else {
            new.import_rows(&chunk.rows).expect("import");
        }
        chunk
    };
    let first = take(&mut cursor);
    assert!(first.rows.iter().any(|r| r.seq == 10) && !first.last);
    // While the transfer runs: an edit of a row already sent, an edit and a delete of rows not
    // sent yet, and a new message.
    act(&old, 10, 2001, ACT_EDIT, "edited 10");
    act(&old, 900, 2002, ACT_EDIT, "edited 900");
    act(&old, 1100, 2003, ACT_DELETE, "");
    old.import_rows(&[row(n + 1, "written meanwhile")])
        .expect("a new row");

    let mut last = None;
    for _ in 0..100 {
        let chunk = take(&mut cursor);
        if chunk.last {
            last = Some(chunk);
            break;
        }
    }
    let last = last.expect("the transfer ends");
    assert!(last.rows.is_empty());
    assert!(cursor.next_chunk(&old).expect("done").is_none());

    let got = texts(&new);
    let find = |seq: u64| got.iter().find(|(s, _, _)| *s == seq).cloned();
    assert_eq!(find(10).map(|t| t.2), Some("edited 10".into()));
    assert_eq!(find(900).map(|t| t.2), Some("edited 900".into()));
    let deleted = find(1100).expect("the deleted row is there, as deleted");
    assert_eq!(deleted.1, "application/vnd.conclave.delete");
    assert!(deleted.2.is_empty());
    assert_eq!(find(n + 1).map(|t| t.2), Some("written meanwhile".into()));
    assert_eq!(find(11).map(|t| t.2), Some("text 11".into()));
    // Every message once, and the old device's history and the new one's are the same.
    let seqs: std::collections::BTreeSet<u64> = got.iter().map(|t| t.0).collect();
    assert_eq!(seqs.len(), got.len());
    assert_eq!(got, texts(&old));
    assert!(last.messages > n, "{}", last.messages);
}

/// A message's id, reply reference and reactions travel with it (also a reaction made while the
/// transfer runs), so the new device applies later acts to it and lists its thread.
#[test]
fn ids_replies_and_reactions_travel_with_the_rows() {
    use conclave_e2ee::payload::ACT_REACT;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let old = Device::open(dirs[0].path(), "alice", "pw").expect("old device");
    let new = Device::open(dirs[1].path(), "alice", "pw").expect("new device");
    old.import_rows(&[
        row(1, "which cable"),
        row(2, "the blue one"),
        row(3, "lunch"),
    ])
    .expect("seed");
    old.note_message(CONV, 1, "m1", None).expect("id");
    old.note_message(CONV, 2, "m2", Some("m1")).expect("id");
    old.note_message(CONV, 3, "m3", None).expect("id");
    let react = |d: &Device, seq: u64, act_seq: u64, from: &str| {
        d.apply_act(
            CONV,
            act_seq,
            from,
            1_700_000_200_000,
            &Payload::Act {
                msg_id: format!("m{seq}"),
                kind: ACT_REACT,
                content_type: "text/plain".into(),
                data: "👍".as_bytes().to_vec(),
            },
        )
        .expect("react")
    };
    assert!(react(&old, 1, 10, "bob"));

    let mut cursor = TransferCursor::start(&old).expect("snapshot");
    let first = cursor.next_chunk(&old).expect("read").expect("a chunk");
    new.import_rows(&first.rows).expect("import");
    // A reaction while the transfer runs comes after the snapshot.
    assert!(react(&old, 3, 11, "carol"));
    for _ in 0..100 {
        let chunk = cursor.next_chunk(&old).expect("read").expect("a chunk");
        if chunk.replaces {
            new.import_replacements(&chunk.rows).expect("import");
        } else {
            new.import_rows(&chunk.rows).expect("import");
        }
        if chunk.last {
            break;
        }
    }
    let (id, st) = new.local_state(CONV, 1).expect("state").expect("known");
    assert_eq!(id, "m1");
    assert_eq!(
        st.reactions,
        vec![("👍".to_string(), vec!["bob".to_string()])]
    );
    let (_, st) = new.local_state(CONV, 3).expect("state").expect("known");
    assert_eq!(
        st.reactions,
        vec![("👍".to_string(), vec!["carol".to_string()])]
    );
    // The thread of m1, and a later act applied on the new device.
    let (conv, root, replies) = new.thread("m1", 10, None).expect("thread").expect("found");
    assert_eq!((conv.as_str(), root, replies), (CONV, 1, vec![2]));
    assert!(
        react(&new, 1, 12, "dave"),
        "a later act finds the message by its id"
    );
}
