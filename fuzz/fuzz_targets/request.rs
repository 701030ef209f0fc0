//! Every request type: one frame body decoded as a `ClientFrame` (the seeds hold one valid
//! frame of every `Request` variant, so mutations explore each), re-encoded byte for byte, and
//! every name in it put through the naming rules the server applies, every file id through
//! the file store's id check.
#![no_main]

use conclave_proto::{Request, names};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = conclave_proto::decode_client(data) else {
        return;
    };
    // postcard has one encoding per value except for non-minimal varints, so a decoded frame
    // re-encodes to at most as many bytes and decodes to itself.
    let again = conclave_proto::encode_client(&frame);
    assert!(again.len() <= data.len());
    assert_eq!(conclave_proto::decode_client(&again).as_ref(), Ok(&frame));
    for name in conclave_fuzz::names_in(&frame.req) {
        if let Ok(c) = names::canonical(name) {
            assert_eq!(names::canonical(&c).as_ref(), Ok(&c));
        }
        let _ = names::canonical_room(name);
        let _ = names::canonical_new_account(name);
    }
    match &frame.req {
        Request::FileStatus { file_id }
        | Request::FileChunk { file_id, .. }
        | Request::FileFetch { file_id, .. }
        | Request::FileDecline { file_id }
        | Request::FileReceived { file_id, .. }
        | Request::FileWantRelay { file_id } => {
            if let Some(id) = conclave_server::files::parse_id(file_id) {
                assert!(id.len() == 36 && !id.contains('/') && !id.contains('.'));
            }
        }
        Request::Send { body, .. } => {
            let _ = body.as_text();
        }
        _ => {}
    }
});
