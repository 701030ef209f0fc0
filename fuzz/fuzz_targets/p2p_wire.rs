//! The peer-to-peer headers a stranger who reaches a sender's UDP port can send (and what a
//! sender answers to a recipient): request, response and verdict.
#![no_main]

use conclave_p2p::wire::{ACK_LEN, Ack, REQUEST_LEN, RESPONSE_LEN, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.first_chunk::<REQUEST_LEN>()
        && let Ok(r) = Request::decode(b)
    {
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }
    if let Some(b) = data.first_chunk::<RESPONSE_LEN>()
        && let Ok(r) = Response::decode(b)
    {
        assert_eq!(Response::decode(&r.encode()), Ok(r));
    }
    if let Some(b) = data.first_chunk::<ACK_LEN>()
        && let Ok(a) = Ack::decode(b)
    {
        assert_eq!(Ack::decode(&a.encode()), Ok(a));
    }
});
