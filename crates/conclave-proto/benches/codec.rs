//! Frame encode/decode: the work every request and every delivered event costs.
//! `cargo bench -p conclave-proto --bench codec`.

use conclave_proto::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn message(text_bytes: usize) -> ServerFrame {
    ServerFrame::Event(Event::Message(Message {
        msg_id: "01a1ffcb-9672-74b7-888b-739cc9fb8c1f".into(),
        conv: Conv::Room("general".into()),
        from: "alice".into(),
        seq: 123_456,
        ts_ms: 1_795_292_894_834,
        body: Body::text("x".repeat(text_bytes)),
        extra: None,
    }))
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [64usize, 4096] {
        let frame = message(size);
        let bytes = encode_server(&frame);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("encode_message_event_{size}"), |b| {
            b.iter(|| encode_server(std::hint::black_box(&frame)))
        });
        g.bench_function(format!("decode_message_event_{size}"), |b| {
            b.iter(|| decode_server(std::hint::black_box(&bytes)).expect("decodes"))
        });
    }
    let send = ClientFrame {
        id: 42,
        req: Request::Send {
            target: Target::Room {
                room: "general".into(),
                except: vec![],
            },
            body: Body::text("x".repeat(64)),
            idempotency_key: Some("01a1ffcb-9672-74b7-888b-739cc9fb8c1f".into()),
            refs: None,
        },
    };
    let bytes = encode_client(&send);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("decode_send_request_64", |b| {
        b.iter(|| decode_client(std::hint::black_box(&bytes)).expect("decodes"))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
