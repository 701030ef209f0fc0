//! The frame codec, as a peer reaches it: a byte stream cut into length-prefixed frames by the
//! server's own reader (`session::read_frame`, with a small limit so oversize prefixes are
//! common), each body decoded as a client frame by the server and as a server frame by the
//! client; plus the 8-byte hello. Nothing may panic, and no frame over the limit may be read.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const MAX_FRAME_BYTES: usize = 4096;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= conclave_proto::hello::HELLO_BYTES {
        let mut h = [0u8; conclave_proto::hello::HELLO_BYTES];
        h.copy_from_slice(&data[..conclave_proto::hello::HELLO_BYTES]);
        let _ = conclave_proto::hello::decode(&h);
    }
    runtime().block_on(async {
        let mut stream = data;
        // At most one frame per 4 bytes of input: the loop is bounded by the input.
        for _ in 0..=data.len() / conclave_proto::FRAME_HEADER_BYTES {
            match conclave_server::session::read_frame(&mut stream, MAX_FRAME_BYTES).await {
                None | Some(Err(_)) => break,
                Some(Ok(body)) => {
                    assert!(body.len() <= MAX_FRAME_BYTES);
                    if let Ok(f) = conclave_proto::decode_client(&body) {
                        // What decodes re-encodes to something that decodes to the same.
                        let again = conclave_proto::encode_client(&f);
                        assert_eq!(conclave_proto::decode_client(&again).as_ref(), Ok(&f));
                    }
                    if let Ok(f) = conclave_proto::decode_server(&body) {
                        let again = conclave_proto::encode_server(&f);
                        assert_eq!(conclave_proto::decode_server(&again).as_ref(), Ok(&f));
                    }
                }
            }
        }
    });
});
