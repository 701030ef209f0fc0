//! The web client's TypeScript protocol types, generated from these Rust types, and the check
//! that the checked-in file (`web/src/generated/protocol.ts`) is what they give.
//!
//! How: `serde-reflection` traces the types through serde itself (the very `Serialize` and
//! `Deserialize` the server uses, attributes and all), giving each container's serde data
//! model; this file maps that model to TypeScript by serde_json's rules. So nothing is
//! annotated or kept by hand twice, and a new request, reply or event appears here on its
//! own. A second test checks the mapping itself: sample frames serialized by serde_json must
//! conform to the very types written out.
//!
//! After changing the protocol: `CONCLAVE_WRITE_TS=1 cargo test -p conclave-proto --test
//! typescript`, and commit the file.

use std::path::PathBuf;

use conclave_proto::*;
use serde_json::Value;
use serde_reflection::{
    ContainerFormat, Format, Named, Registry, Tracer, TracerConfig, VariantFormat,
};

/// Where the generated file lives, from this crate's directory.
const OUTPUT: &str = "../../web/src/generated/protocol.ts";

fn registry() -> Registry {
    // Text that every string type parses from (socket addresses check theirs); the names
    // and ids of the protocol accept any text.
    const SAMPLE_TEXT: &str = "127.0.0.1:7667";
    let mut tracer = Tracer::new(
        TracerConfig::default()
            .is_human_readable(true)
            .default_borrowed_str_value(SAMPLE_TEXT)
            .default_string_value(SAMPLE_TEXT.to_string()),
    );
    // Each enum is traced on its own, so that all its variants are explored (a trace from
    // the top explores every variant of the top enum only).
    macro_rules! trace {
        ($($t:ty),* $(,)?) => {$(
            tracer
                .trace_simple_type::<$t>()
                .unwrap_or_else(|e| panic!("trace {}: {e}", stringify!($t)));
        )*};
    }
    trace!(
        ClientFrame,
        ServerFrame,
        Request,
        Reply,
        Event,
        Result<Reply, ErrorBody>,
        Conv,
        ConvRef,
        Target,
        DisconnectReason,
        ErrorCode,
        conclave_proto::chat::ActKind,
    );
    tracer.registry().unwrap_or_else(|e| {
        panic!("{e}: add the enums it names to the list traced in registry() above")
    })
}

/// A field or element type in serde_json's JSON, as TypeScript.
fn ts(f: &Format) -> String {
    match f {
        Format::TypeName(n) => n.clone(),
        Format::Unit => "null".into(),
        Format::Bool => "boolean".into(),
        // Every integer is a JSON number (values above 2^53 lose precision in JavaScript;
        // the protocol's ids and sequence numbers stay far below).
        Format::I8
        | Format::I16
        | Format::I32
        | Format::I64
        | Format::I128
        | Format::U8
        | Format::U16
        | Format::U32
        | Format::U64
        | Format::U128
        | Format::F32
        | Format::F64 => "number".into(),
        Format::Char | Format::Str => "string".into(),
        // serde_json writes bytes as an array of numbers.
        Format::Bytes => "number[]".into(),
        Format::Option(inner) => format!("{} | null", ts(inner)),
        Format::Seq(inner) => format!("{}[]", paren(inner)),
        Format::TupleArray { content, .. } => format!("{}[]", paren(content)),
        Format::Map { value, .. } => format!("Record<string, {}>", ts(value)),
        Format::Tuple(items) => {
            format!("[{}]", items.iter().map(ts).collect::<Vec<_>>().join(", "))
        }
        Format::Variable(_) => panic!("an untraced type: trace it fully"),
    }
}

/// An element type, in parentheses when it is a union.
fn paren(f: &Format) -> String {
    let t = ts(f);
    if t.contains(' ') { format!("({t})") } else { t }
}

fn fields(fields: &[Named<Format>]) -> String {
    let inner: Vec<String> = fields
        .iter()
        .map(|f| format!("{}: {}", f.name, ts(&f.value)))
        .collect();
    format!("{{ {} }}", inner.join("; "))
}

fn container(c: &ContainerFormat) -> String {
    match c {
        ContainerFormat::UnitStruct => "null".into(),
        ContainerFormat::NewTypeStruct(f) => ts(f),
        ContainerFormat::TupleStruct(items) => ts(&Format::Tuple(items.clone())),
        ContainerFormat::Struct(fs) => fields(fs),
        // serde's default, externally tagged: "Unit", { "Name": content }.
        ContainerFormat::Enum(variants) => {
            let arms: Vec<String> = variants
                .values()
                .map(|v| {
                    let content = match &v.value {
                        VariantFormat::Unit => return format!("\"{}\"", v.name),
                        VariantFormat::NewType(f) => ts(f),
                        VariantFormat::Tuple(items) => ts(&Format::Tuple(items.clone())),
                        VariantFormat::Struct(fs) => fields(fs),
                        VariantFormat::Variable(_) => panic!("an untraced variant: {}", v.name),
                    };
                    format!("{{ {}: {} }}", v.name, content)
                })
                .collect();
            format!("\n  | {}", arms.join("\n  | "))
        }
    }
}

fn generate() -> String {
    let mut out = String::from(
        "// Generated from the Rust protocol types (crates/conclave-proto) by\n\
         // `CONCLAVE_WRITE_TS=1 cargo test -p conclave-proto --test typescript`. Do not edit:\n\
         // `cargo test` fails when this file differs from what the Rust types give.\n\
         //\n\
         // These are the JSON forms (serde_json) of the native protocol's frames: the web client\n\
         // sends one ClientFrame per WebSocket text message and receives one ServerFrame per\n\
         // message (docs/web.md). Bytes are arrays of numbers; absent optional values are null.\n\n",
    );
    out.push_str(&format!(
        "export const PROTOCOL_VERSION = {PROTOCOL_VERSION};\n\n"
    ));
    for (name, c) in registry() {
        let body = container(&c);
        let sep = if body.starts_with('\n') { "" } else { " " };
        out.push_str(&format!("export type {name} ={sep}{body};\n\n"));
    }
    out.pop();
    out
}

#[test]
fn the_checked_in_typescript_types_are_what_the_rust_types_give() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(OUTPUT);
    let want = generate();
    if std::env::var("CONCLAVE_WRITE_TS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("create the directory");
        std::fs::write(&path, &want).expect("write the TypeScript types");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is out of date with the Rust protocol types: run \
         `CONCLAVE_WRITE_TS=1 cargo test -p conclave-proto --test typescript` and commit it",
        path.display()
    );
}

/// Whether `v` is a value of `f` as the generated TypeScript says.
fn conforms(v: &Value, f: &Format, reg: &Registry) -> bool {
    match f {
        Format::TypeName(n) => conforms_container(v, &reg[n], reg),
        Format::Unit => v.is_null(),
        Format::Bool => v.is_boolean(),
        Format::Char | Format::Str => v.is_string(),
        Format::Option(inner) => v.is_null() || conforms(v, inner, reg),
        Format::Bytes => v
            .as_array()
            .is_some_and(|a| a.iter().all(|b| b.as_u64().is_some_and(|b| b < 256))),
        Format::Seq(inner) | Format::TupleArray { content: inner, .. } => v
            .as_array()
            .is_some_and(|a| a.iter().all(|x| conforms(x, inner, reg))),
        Format::Map { value, .. } => v
            .as_object()
            .is_some_and(|o| o.values().all(|x| conforms(x, value, reg))),
        Format::Tuple(items) => v.as_array().is_some_and(|a| {
            a.len() == items.len() && a.iter().zip(items).all(|(x, f)| conforms(x, f, reg))
        }),
        Format::Variable(_) => false,
        _ => v.is_number(),
    }
}

fn conforms_fields(v: &Value, fs: &[Named<Format>], reg: &Registry) -> bool {
    let Some(o) = v.as_object() else { return false };
    o.len() == fs.len()
        && fs
            .iter()
            .all(|f| o.get(&f.name).is_some_and(|x| conforms(x, &f.value, reg)))
}

fn conforms_container(v: &Value, c: &ContainerFormat, reg: &Registry) -> bool {
    match c {
        ContainerFormat::UnitStruct => v.is_null(),
        ContainerFormat::NewTypeStruct(f) => conforms(v, f, reg),
        ContainerFormat::TupleStruct(items) => conforms(v, &Format::Tuple(items.clone()), reg),
        ContainerFormat::Struct(fs) => conforms_fields(v, fs, reg),
        ContainerFormat::Enum(variants) => variants.values().any(|var| match &var.value {
            VariantFormat::Unit => v.as_str() == Some(var.name.as_str()),
            other => {
                let Some(o) = v.as_object() else { return false };
                let Some(content) = o.get(&var.name) else {
                    return false;
                };
                o.len() == 1
                    && match other {
                        VariantFormat::NewType(f) => conforms(content, f, reg),
                        VariantFormat::Tuple(items) => {
                            conforms(content, &Format::Tuple(items.clone()), reg)
                        }
                        VariantFormat::Struct(fs) => conforms_fields(content, fs, reg),
                        _ => false,
                    }
            }
        }),
    }
}

#[test]
fn serde_json_frames_conform_to_the_generated_types() {
    let reg = registry();
    let client = [
        ClientFrame {
            id: 1,
            req: Request::Rooms,
        },
        ClientFrame {
            id: 2,
            req: Request::Login {
                user: "alice".into(),
                password: "pw".into(),
                server_password: None,
                resume: vec![Cursor {
                    conv: Conv::Direct(vec!["alice".into(), "bob".into()]),
                    seq: 4,
                }],
            },
        },
        ClientFrame {
            id: 3,
            req: Request::Send {
                target: Target::Room {
                    room: "lab".into(),
                    except: vec!["carol".into()],
                },
                body: Body::text("hi"),
                idempotency_key: Some("k".into()),
                refs: None,
            },
        },
        ClientFrame {
            id: 4,
            req: Request::FileOffer {
                target: Target::Users {
                    to: vec!["bob".into()],
                },
                name: "a.txt".into(),
                size: 3,
                sha256: [7; 32],
                p2p: None,
            },
        },
        ClientFrame {
            id: 5,
            req: Request::E2eeCommit {
                conv: ConvRef::With(vec!["bob".into()]),
                commit: Bytes::from(vec![1, 2, 3]),
                group_info: Bytes::from(vec![4]),
                welcome: None,
            },
        },
    ];
    for f in &client {
        let v = serde_json::to_value(f).expect("json");
        assert!(
            conforms(&v, &Format::TypeName("ClientFrame".into()), &reg),
            "{v}"
        );
        // And the JSON is read back as the same frame (what the server does with it).
        assert_eq!(&serde_json::from_value::<ClientFrame>(v).expect("back"), f);
    }
    let server = [
        ServerFrame::Reply {
            id: 1,
            result: Ok(Reply::Ok),
        },
        ServerFrame::Reply {
            id: 2,
            result: Err(ErrorBody::new(ErrorCode::NotLoggedIn, "log in")),
        },
        ServerFrame::Reply {
            id: 3,
            result: Ok(Reply::Messages(vec![Message {
                msg_id: "m".into(),
                conv: Conv::Room("lab".into()),
                from: "bob".into(),
                seq: 1,
                ts_ms: -5,
                body: Body::text("hello"),
                extra: None,
            }])),
        },
        ServerFrame::Event(Event::CaughtUp {
            count: 0,
            truncated: false,
        }),
        ServerFrame::Event(Event::Disconnect {
            reason: DisconnectReason::Quit,
            message: "bye".into(),
        }),
        ServerFrame::Reply {
            id: 4,
            result: Ok(Reply::FileData {
                offset: 0,
                data: Chunk(vec![9, 9]),
            }),
        },
    ];
    for f in &server {
        let v = serde_json::to_value(f).expect("json");
        assert!(
            conforms(&v, &Format::TypeName("ServerFrame".into()), &reg),
            "{v}"
        );
    }
    // The checks bite: a wrong shape does not conform.
    let wrong = serde_json::json!({"id": 1, "req": {"Rooms": {}}});
    assert!(!conforms(
        &wrong,
        &Format::TypeName("ClientFrame".into()),
        &reg
    ));
}
