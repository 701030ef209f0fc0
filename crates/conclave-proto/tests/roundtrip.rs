//! Property tests: every client frame and every server frame, with arbitrary contents, survives
//! encode → decode unchanged; its encoding decodes with no byte left over, and no shorter
//! prefix of it decodes to a frame (a frame is exactly one message). Strategies cover every
//! variant of `Request`, `Reply`, `Event`, `ErrorCode` and `DisconnectReason`.

use std::net::SocketAddr;

use conclave_proto::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;

fn s() -> impl Strategy<Value = String> {
    // Any Unicode, short: names, passwords, texts.
    ".{0,12}"
}

fn names() -> impl Strategy<Value = Vec<String>> {
    vec(s(), 0..4)
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..48)
}

fn conv() -> impl Strategy<Value = Conv> {
    prop_oneof![s().prop_map(Conv::Room), names().prop_map(Conv::Direct)]
}

fn cursor() -> impl Strategy<Value = Cursor> {
    (conv(), any::<u64>()).prop_map(|(conv, seq)| Cursor { conv, seq })
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (s(), names()).prop_map(|(room, except)| Target::Room { room, except }),
        names().prop_map(|to| Target::Users { to }),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    (s(), bytes()).prop_map(|(content_type, data)| Body { content_type, data })
}

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
    ]
}

fn p2p_offer() -> impl Strategy<Value = P2pOffer> {
    (vec(addr(), 0..3), any::<[u8; 32]>())
        .prop_map(|(addrs, fingerprint)| P2pOffer { addrs, fingerprint })
}

fn message() -> impl Strategy<Value = Message> {
    (s(), conv(), s(), any::<u64>(), any::<i64>(), body()).prop_map(
        |(msg_id, conv, from, seq, ts_ms, body)| Message {
            msg_id,
            conv,
            from,
            seq,
            ts_ms,
            body,
            extra: None,
        },
    )
}

fn file_offer() -> impl Strategy<Value = FileOffer> {
    let invite = (vec(addr(), 0..3), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
        |(addrs, fingerprint, token)| P2pInvite {
            addrs,
            fingerprint,
            token,
        },
    );
    (
        (s(), s(), conv(), names(), s()),
        (any::<u64>(), any::<[u8; 32]>(), any::<u32>(), any::<i64>()),
        (any::<i64>(), any::<bool>(), of(invite)),
    )
        .prop_map(
            |(
                (file_id, from, conv, except, name),
                (size, sha256, chunk_size, ts_ms),
                (expires_ms, relay_ready, p2p),
            )| FileOffer {
                file_id,
                from,
                conv,
                except,
                name,
                size,
                sha256,
                chunk_size,
                ts_ms,
                expires_ms,
                relay_ready,
                p2p,
            },
        )
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (s(), s(), of(s()), vec(cursor(), 0..3)).prop_map(|(user, password, sp, resume)| {
            Request::Login {
                user,
                password,
                server_password: sp,
                resume,
            }
        }),
        (s(), s(), of(s()), of(s())).prop_map(|(user, password, sp, invite)| {
            Request::Register {
                user,
                password,
                server_password: sp,
                invite_code: invite,
            }
        }),
        (s(), any::<bool>(), of(s())).prop_map(|(room, private, password)| {
            Request::CreateRoom {
                room,
                private,
                password,
            }
        }),
        (s(), of(s())).prop_map(|(room, password)| Request::Join { room, password }),
        s().prop_map(|room| Request::Part { room }),
        (s(), s()).prop_map(|(room, user)| Request::Invite { room, user }),
        Just(Request::Rooms),
        of(s()).prop_map(|room| Request::Who { room }),
        (target(), body(), of(s())).prop_map(|(target, body, key)| Request::Send {
            target,
            body,
            idempotency_key: key,
            refs: None,
        }),
        s().prop_map(|text| Request::Announce { text }),
        (
            prop_oneof![s().prop_map(ConvRef::Room), names().prop_map(ConvRef::With)],
            any::<u32>(),
            of(any::<u64>())
        )
            .prop_map(|(conv, limit, before)| Request::History {
                conv,
                limit,
                before
            }),
        (s(), of(s()), any::<u32>(), of(s())).prop_map(|(query, room, limit, before)| {
            Request::Search {
                query,
                room,
                limit,
                before,
            }
        }),
        vec(cursor(), 0..4).prop_map(|cursors| Request::Ack { cursors }),
        (of(s()), s(), of(s())).prop_map(|(room, user, reason)| Request::Kick {
            room,
            user,
            reason
        }),
        (s(), s()).prop_map(|(room, user)| Request::VoteKick { room, user }),
        (of(s()), of(s()), of(any::<u64>()), of(s())).prop_map(|(user, ip, d, reason)| {
            Request::Ban {
                user,
                ip,
                duration_s: d,
                reason,
            }
        }),
        (of(s()), of(s())).prop_map(|(user, ip)| Request::Unban { user, ip }),
        (s(), of(any::<bool>())).prop_map(|(room, votekick)| Request::SetRoom { room, votekick }),
        any::<u64>().prop_map(|nonce| Request::Ping { nonce }),
        Just(Request::Quit),
        (
            target(),
            s(),
            any::<u64>(),
            any::<[u8; 32]>(),
            of(p2p_offer())
        )
            .prop_map(|(target, name, size, sha256, p2p)| Request::FileOffer {
                target,
                name,
                size,
                sha256,
                p2p,
            }),
        s().prop_map(|file_id| Request::FileStatus { file_id }),
        (s(), any::<u64>(), bytes()).prop_map(|(file_id, offset, data)| Request::FileChunk {
            file_id,
            offset,
            data: Chunk(data),
        }),
        (s(), any::<u64>()).prop_map(|(file_id, offset)| Request::FileFetch { file_id, offset }),
        s().prop_map(|file_id| Request::FileDecline { file_id }),
        s().prop_map(|file_id| Request::FileCancel { file_id }),
        (s(), any::<bool>())
            .prop_map(|(file_id, via_p2p)| Request::FileReceived { file_id, via_p2p }),
        s().prop_map(|file_id| Request::FileWantRelay { file_id }),
        Just(Request::Files),
        (s(), vec(bytes(), 0..3)).prop_map(|(device, kps)| Request::E2eePublish {
            device,
            key_packages: kps.into_iter().map(Bytes::from).collect(),
        }),
        vec(s(), 0..3).prop_map(|users| Request::E2eeClaim { users }),
        (s(), bytes()).prop_map(|(room, gi)| Request::E2eeCreate {
            conv: ConvRef::Room(room),
            group_info: Bytes::from(gi),
        }),
        vec(s(), 0..3).prop_map(|with| Request::E2eeGroupInfo {
            conv: ConvRef::With(with)
        }),
        (s(), bytes(), bytes(), of(bytes())).prop_map(|(room, commit, gi, welcome)| {
            Request::E2eeCommit {
                conv: ConvRef::Room(room),
                commit: Bytes::from(commit),
                group_info: Bytes::from(gi),
                welcome: welcome.map(Bytes::from),
            }
        }),
        any::<u64>().prop_map(|id| Request::E2eeWelcomeDone { id }),
        s().prop_map(|user| Request::E2eeDevices { user }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    proptest::sample::select(vec![
        BadRequest,
        NotLoggedIn,
        AlreadyLoggedIn,
        AuthFailed,
        ServerPassword,
        RegistrationClosed,
        InviteRequired,
        NameTaken,
        InvalidName,
        NoSuchRoom,
        NoSuchUser,
        NotMember,
        Forbidden,
        RoomExists,
        RoomPassword,
        TooLarge,
        RateLimited,
        Unsupported,
        ShuttingDown,
        Internal,
        NotFound,
        QuotaExceeded,
        Expired,
        NotReady,
        Declined,
        StaleEpoch,
        E2eeRequired,
        StorageFull,
    ])
}

fn reply() -> impl Strategy<Value = Reply> {
    let room_info = (
        s(),
        any::<bool>(),
        any::<bool>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_flat_map(|(room, private, has_password, members, online)| {
            (any::<bool>(), of(s())).prop_map(move |(member, owner)| RoomInfo {
                room: room.clone(),
                private,
                has_password,
                members,
                online,
                member,
                owner: owner.clone(),
                e2ee: member,
                topic: owner,
            })
        });
    let presence = (
        s(),
        any::<bool>(),
        any::<u32>(),
        any::<bool>(),
        of(s()),
        of(s()),
    )
        .prop_map(
            |(user, online, connections, admin, display_name, away)| UserPresence {
                user,
                online,
                connections,
                admin,
                display_name,
                away,
            },
        );
    let grant = (s(), any::<[u8; 32]>()).prop_map(|(user, token)| P2pGrant { user, token });
    prop_oneof![
        Just(Reply::Ok),
        (s(), any::<bool>(), names()).prop_map(|(user, admin, rooms)| Reply::LoggedIn {
            user,
            admin,
            rooms
        }),
        (s(), any::<u64>(), any::<i64>(), any::<bool>()).prop_map(
            |(msg_id, seq, ts_ms, duplicate)| Reply::Sent {
                msg_id,
                seq,
                ts_ms,
                duplicate
            }
        ),
        (s(), names()).prop_map(|(room, members)| Reply::Joined { room, members }),
        vec(room_info, 0..3).prop_map(Reply::Rooms),
        vec(presence, 0..3).prop_map(Reply::Users),
        vec(message(), 0..3).prop_map(Reply::Messages),
        vec(message(), 0..3).prop_map(Reply::Results),
        any::<u64>().prop_map(|nonce| Reply::Pong { nonce }),
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(votes, needed, kicked)| {
            Reply::VoteCounted {
                votes,
                needed,
                kicked,
            }
        }),
        (
            (s(), any::<u32>(), any::<u64>()),
            (any::<i64>(), any::<bool>(), vec(grant, 0..3))
        )
            .prop_map(
                |((file_id, chunk_size, uploaded), (expires_ms, relay_needed, tokens))| {
                    Reply::FileCreated {
                        file_id,
                        chunk_size,
                        uploaded,
                        expires_ms,
                        relay_needed,
                        tokens,
                    }
                }
            ),
        (any::<u64>(), any::<bool>(), any::<u32>()).prop_map(|(uploaded, complete, chunk_size)| {
            Reply::FileUploaded {
                uploaded,
                complete,
                chunk_size,
            }
        }),
        (any::<u64>(), bytes()).prop_map(|(offset, data)| Reply::FileData {
            offset,
            data: Chunk(data)
        }),
        vec(file_offer(), 0..2).prop_map(Reply::Files),
        (bytes(), any::<u32>()).prop_map(|(k, n)| Reply::E2eeReady {
            server_key: Bytes::from(k),
            key_packages: n,
        }),
        vec((s(), s(), bytes()), 0..3).prop_map(|v| Reply::E2eeKeyPackages(
            v.into_iter()
                .map(|(user, device, kp)| ClaimedKeyPackage {
                    user,
                    device,
                    key_package: Bytes::from(kp),
                })
                .collect()
        )),
        of((bytes(), any::<u64>(), any::<u64>())).prop_map(|g| Reply::E2eeGroupInfo(g.map(
            |(gi, epoch, seq)| GroupInfoData {
                group_info: Bytes::from(gi),
                epoch,
                seq,
            }
        ))),
        vec((s(), s(), bytes()), 0..3).prop_map(|v| Reply::E2eeDevices(
            v.into_iter()
                .map(|(user, device, k)| DeviceInfo {
                    user,
                    device,
                    signature_key: Bytes::from(k),
                })
                .collect()
        )),
    ]
}

fn reason() -> impl Strategy<Value = DisconnectReason> {
    use DisconnectReason::*;
    proptest::sample::select(vec![
        Quit,
        Shutdown,
        Malformed,
        TooLarge,
        SlowConsumer,
        Timeout,
        Kicked,
        Banned,
        Flooding,
        Other,
    ])
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        message().prop_map(Event::Message),
        (s(), s()).prop_map(|(room, user)| Event::Join { room, user }),
        (s(), s()).prop_map(|(room, user)| Event::Part { room, user }),
        (s(), any::<bool>()).prop_map(|(user, online)| Event::Presence { user, online }),
        (s(), s()).prop_map(|(room, by)| Event::Invited { room, by }),
        (any::<u32>(), any::<bool>())
            .prop_map(|(count, truncated)| Event::CaughtUp { count, truncated }),
        (of(s()), s(), s(), s()).prop_map(|(room, user, by, reason)| Event::Kicked {
            room,
            user,
            by,
            reason
        }),
        (s(), s(), s(), any::<u32>(), any::<u32>()).prop_map(
            |(room, target, voter, votes, needed)| Event::VoteKick {
                room,
                target,
                voter,
                votes,
                needed
            }
        ),
        (s(), s(), any::<i64>()).prop_map(|(from, text, ts_ms)| Event::Announce {
            from,
            text,
            ts_ms
        }),
        (reason(), s()).prop_map(|(reason, message)| Event::Disconnect { reason, message }),
        file_offer().prop_map(|o| Event::FileOffer(Box::new(o))),
        s().prop_map(|file_id| Event::FileReady { file_id }),
        (s(), s()).prop_map(|(file_id, by)| Event::FileRelayWanted { file_id, by }),
        (s(), s()).prop_map(|(file_id, by)| Event::FileDeclined { file_id, by }),
        (s(), s()).prop_map(|(file_id, by)| Event::FileCancelled { file_id, by }),
        (s(), s(), any::<bool>()).prop_map(|(file_id, by, via_p2p)| Event::FileReceived {
            file_id,
            by,
            via_p2p
        }),
        (any::<u64>(), s(), conv(), any::<u64>(), bytes()).prop_map(
            |(id, device, conv, seq, w)| Event::E2eeWelcome {
                id,
                device,
                conv,
                seq,
                welcome: Bytes::from(w),
            }
        ),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (
            any::<u64>(),
            prop_oneof![
                reply().prop_map(Ok),
                (error_code(), s()).prop_map(|(c, m)| Err(ErrorBody::new(c, m)))
            ]
        )
            .prop_map(|(id, result)| ServerFrame::Reply { id, result }),
        event().prop_map(ServerFrame::Event),
    ]
}

/// No strict prefix of a frame's encoding decodes (checked at a few cut points).
fn no_prefix_decodes<T>(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<T, DecodeError>) {
    let n = bytes.len();
    for cut in [0, 1, n / 2, n.saturating_sub(1)] {
        if cut < n {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "a {cut}-byte prefix of {n} decoded"
            );
        }
    }
}

fn conv_ref() -> impl Strategy<Value = ConvRef> {
    prop_oneof![s().prop_map(ConvRef::Room), names().prop_map(ConvRef::With)]
}

/// The requests, replies and events of everyday chat's presence side (issue #20, part B).
fn chat_client_frame() -> impl Strategy<Value = ClientFrame> {
    let req = prop_oneof![
        conv_ref().prop_map(|conv| Request::Typing { conv }),
        (conv_ref(), any::<u64>()).prop_map(|(conv, seq)| Request::Read { conv, seq }),
        conv_ref().prop_map(|conv| Request::ReadMarkers { conv }),
        any::<bool>().prop_map(|share| Request::ShareReads { share }),
        (s(), s()).prop_map(|(room, topic)| Request::SetTopic { room, topic }),
        of(s()).prop_map(|text| Request::Away { text }),
        of(s()).prop_map(|name| Request::SetDisplayName { name }),
    ];
    (any::<u64>(), req).prop_map(|(id, req)| ClientFrame { id, req })
}

fn chat_server_frame() -> impl Strategy<Value = ServerFrame> {
    let marker = (s(), any::<u64>(), any::<i64>())
        .prop_map(|(user, seq, ts_ms)| conclave_proto::chat::ReadMarker { user, seq, ts_ms });
    let event = prop_oneof![
        (conv(), s()).prop_map(|(conv, user)| Event::Typing { conv, user }),
        (conv(), s(), any::<u64>()).prop_map(|(conv, user, seq)| Event::Read { conv, user, seq }),
        (s(), s(), s()).prop_map(|(room, topic, by)| Event::Topic { room, topic, by }),
        (s(), of(s())).prop_map(|(user, text)| Event::Away { user, text }),
        (s(), of(s())).prop_map(|(user, name)| Event::DisplayName { user, name }),
    ];
    prop_oneof![
        event.prop_map(ServerFrame::Event),
        (any::<u64>(), vec(marker, 0..3)).prop_map(|(id, m)| ServerFrame::Reply {
            id,
            result: Ok(Reply::ReadMarkers(m)),
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn chat_frames_round_trip(c in chat_client_frame(), sf in chat_server_frame()) {
        let bytes = encode_client(&c);
        prop_assert_eq!(decode_client(&bytes), Ok(c));
        no_prefix_decodes(&bytes, decode_client);
        let bytes = encode_server(&sf);
        prop_assert_eq!(decode_server(&bytes), Ok(sf));
        no_prefix_decodes(&bytes, decode_server);
    }

    #[test]
    fn client_frames_round_trip(id in any::<u64>(), req in request()) {
        let frame = ClientFrame { id, req };
        let bytes = encode_client(&frame);
        prop_assert!(!bytes.is_empty());
        prop_assert_eq!(decode_client(&bytes), Ok(frame));
        no_prefix_decodes(&bytes, decode_client);
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let bytes = encode_server(&frame);
        prop_assert!(!bytes.is_empty());
        prop_assert_eq!(decode_server(&bytes), Ok(frame));
        no_prefix_decodes(&bytes, decode_server);
    }

    #[test]
    fn hello_round_trips(version in any::<u16>(), ok in any::<bool>()) {
        let status = if ok { hello::HelloStatus::Ok } else { hello::HelloStatus::UnsupportedVersion };
        let h = hello::decode(&hello::encode(version, status)).expect("decodes");
        prop_assert_eq!(h, hello::Hello { version, status });
    }

    #[test]
    fn error_codes_have_distinct_stable_names(a in error_code(), b in error_code()) {
        prop_assert_eq!(a == b, a.as_str() == b.as_str());
    }
}
