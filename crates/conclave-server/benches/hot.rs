//! Hot paths outside the store: the hub's fan-out decision and sealing a body at rest.
//! `cargo bench -p conclave-server --bench hot`.

use conclave_proto::Target;
use conclave_server::at_rest::DataKey;
use conclave_server::hub::{Hub, HubLimits};
use conclave_server::store::RoomRow;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// A hub with one room of `members` members, all online (handles are plain numbers).
fn hub(members: usize) -> Hub<u64> {
    let names: Vec<String> = (0..members).map(|i| format!("user{i}")).collect();
    let mut h = Hub::new(
        HubLimits {
            max_message_bytes: 65_536,
            max_recipients: 100,
            max_rooms: 10,
        },
        names.iter().map(|n| (n.clone(), false)),
        [RoomRow {
            name: "general".into(),
            private: false,
            pw_hash: None,
            owner: None,
            members: names.clone(),
            invited: vec![],
            votekick: true,
        }],
    );
    for (i, n) in names.iter().enumerate() {
        h.connect(n, i as u64, i as u64);
        h.set_live(i as u64);
    }
    h
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub");
    for members in [100usize, 500] {
        let h = hub(members);
        let target = Target::Room {
            room: "general".into(),
            except: vec![],
        };
        g.throughput(Throughput::Elements(members as u64 - 1));
        g.bench_with_input(
            BenchmarkId::new("check_send_and_recipients", members),
            &members,
            |b, _| {
                b.iter(|| {
                    let checked = h.check_send("user0", &target, 64).expect("allowed");
                    let mut n = 0u64;
                    for o in h.recipients(&checked.conv, &checked.except, Some(0)) {
                        n += *o;
                    }
                    n
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("presence_audience", members),
            &members,
            |b, _| b.iter(|| h.presence_audience("user0").len()),
        );
    }
    g.finish();
}

fn seal(c: &mut Criterion) {
    let key = DataKey::from_bytes(&[7u8; 32]).expect("key");
    let mut g = c.benchmark_group("at_rest");
    for size in [64usize, 4096] {
        let body = vec![b'x'; size];
        let sealed = key.seal(b"ad", &body);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("seal_{size}"), |b| {
            b.iter(|| {
                key.seal(
                    b"conclave-msg-v1|id|r:general|1",
                    std::hint::black_box(&body),
                )
            })
        });
        g.bench_function(format!("open_{size}"), |b| {
            b.iter(|| {
                key.open(b"ad", std::hint::black_box(&sealed))
                    .expect("opens")
            })
        });
    }
    g.finish();
}

/// A message's search-index tokens (computed once per message, in the sender's task).
fn tokens(c: &mut Criterion) {
    let key = conclave_server::search::SearchKey::new(&[9u8; 32]);
    let mut g = c.benchmark_group("search");
    // A chat line of ten distinct words (one twice), and 64 bytes of the bench's stamped text.
    for (name, text) in [
        (
            "tokens_chat_line",
            "Deploying the new build to staging at five, deploy ok?",
        ),
        (
            "tokens_stamp_64",
            "cb 0000002a 1796689814388535161 axxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| key.tokens_text(std::hint::black_box(text)))
        });
    }
    g.finish();
}

criterion_group!(benches, fanout, seal, tokens);
criterion_main!(benches);
