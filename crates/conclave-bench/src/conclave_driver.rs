//! Driving a Conclave server.
//!
//! Senders use the real client library (`conclave-client`): sends are pipelined up to a window
//! and each is acknowledged once durable, exactly as a user's client does it. The other members
//! of a traffic run, and every connection of an idle run, use a minimal raw client instead: TCP
//! (from a spread of loopback source addresses), TLS 1.3 pinned to the fingerprint, the hello,
//! a login (or registration) frame, a join, then only reading (and a ping now and then). The
//! library does much more per received message (cursors, de-duplication, an event queue,
//! acknowledgements) and made the generator, not the server, the limit of a fan-out on two
//! CPUs; `--full-clients` puts every member on the library anyway.
//!
//! Every member's frames are read from the moment it is in its room, so join and presence
//! events never fill its queue at the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use conclave_client::proto::hello::{self, HELLO_BYTES, HelloStatus};
use conclave_client::proto::{
    Body, ClientFrame, ErrorCode, Event, PROTOCOL_VERSION, Reply, Request, ServerFrame, Target,
    decode_server, encode_client,
};
use conclave_client::{
    Auth, Client, ClientError, ClientEvent, ConnectOptions, Events, PendingReply, Reconnect, Trust,
};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::measure::{Recorder, now_ns, parse_stamp_from, stamp_text_from};
use crate::net::{self, CertCheck};
use crate::run::{CONNECT_TIMEOUT, Ctx, JOIN_TIMEOUT, Pacer, Phase, SETTLE};
use crate::stamped::StampedTcp;

/// The password of every benchmark account.
pub const BENCH_PASSWORD: &str = "conclave-bench-password";
/// Keep-alive of the idle raw connections (well under the server's idle timeout).
const IDLE_PING_EVERY: Duration = Duration::from_secs(30);
/// Largest frame the raw client accepts.
const RAW_MAX_FRAME_BYTES: usize = conclave_client::proto::DEFAULT_MAX_FRAME_BYTES;
/// Bound on waiting for the tasks of a finished run to hand back their results.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a request of the benchmark (joins excepted, see [`JOIN_TIMEOUT`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of benchmark account `i`.
pub fn account(i: usize) -> String {
    format!("bench{i}")
}

/// The `--server` list for connection `i`: the list turned so that address `i mod n` comes
/// first, the others after it in their order. A value that is not a list is given as it is
/// (the connection says what is wrong with it).
pub fn spread(servers: &str, i: usize) -> String {
    let Ok(list) = conclave_client::ServerList::parse(servers) else {
        return servers.to_string();
    };
    (0..list.len())
        .map(|k| list.get(i + k).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Where and how to connect.
pub struct ConclaveTarget {
    /// `host:port`, or several separated by commas (the nodes of a cluster): connection `i`
    /// goes to address `i mod n` first (see [`spread`]), so the load is spread over the
    /// nodes, and fails over to the others in turn.
    pub server: String,
    /// Lower-case hex SHA-256 of the server's certificate.
    pub fingerprint: String,
    /// Create the accounts by registering over the wire (else they exist already).
    pub register: bool,
    /// For the client library's `known_servers` (never the user's own).
    pub state_dir: PathBuf,
    /// Every member uses the client library (else only the senders do).
    pub full_clients: bool,
    /// The raw connections offer only X25519 (as a client from before post-quantum key
    /// exchange), to compare the classical handshake's cost.
    pub classical_kx: bool,
}

/// Runs the scenario against a Conclave server.
pub async fn run(ctx: Arc<Ctx>, target: Arc<ConclaveTarget>) {
    if let Ok(list) = conclave_client::ServerList::parse(&target.server) {
        ctx.servers
            .store(list.len().max(1), std::sync::atomic::Ordering::Relaxed);
    }
    warm_up(&ctx, &target).await;
    if ctx.scn.is_idle() {
        idle(ctx, target).await
    } else {
        traffic(ctx, target).await
    }
}

// ---- traffic -------------------------------------------------------------------------------

/// One member of a traffic run.
enum Member {
    /// The client library: senders always, everyone with `--full-clients`.
    Lib {
        client: Client,
        receiver: JoinHandle<Recorder>,
    },
    /// The raw client, already in its room, reading in its own task.
    Raw { receiver: JoinHandle<Recorder> },
}

fn options(t: &ConclaveTarget, i: usize, register: bool) -> ConnectOptions {
    let user = account(i);
    let password = BENCH_PASSWORD.to_string();
    let auth = if register {
        Auth::Register {
            user,
            password,
            server_password: None,
            invite_code: None,
        }
    } else {
        Auth::Login {
            user,
            password,
            server_password: None,
        }
    };
    let mut o = ConnectOptions::new(spread(&t.server, i), auth);
    o.trust = Trust::Fingerprint(t.fingerprint.clone());
    o.state_dir = Some(t.state_dir.clone());
    // A drop is something to report, not to hide behind a reconnect.
    o.reconnect = Reconnect::never();
    o.connect_timeout = CONNECT_TIMEOUT;
    o.handshake_timeout = CONNECT_TIMEOUT;
    o.request_timeout = REQUEST_TIMEOUT;
    o
}

async fn connect_lib(ctx: &Arc<Ctx>, t: &ConclaveTarget, i: usize) -> Option<Member> {
    let attempt = async {
        match Client::connect(options(t, i, t.register)).await {
            // Made by an earlier run: log in to it.
            Err(ClientError::Server(e)) if t.register && e.code == ErrorCode::NameTaken => {
                Client::connect(options(t, i, false)).await
            }
            other => other,
        }
    };
    match timeout_at(ctx.bounded(CONNECT_TIMEOUT), attempt).await {
        Ok(Ok((client, events, _session))) => {
            ctx.connected.fetch_add(1, Ordering::Relaxed);
            let receiver = tokio::spawn(receive(events, ctx.clone(), ctx.node_of(i)));
            Some(Member::Lib { client, receiver })
        }
        Ok(Err(e)) => {
            ctx.counters.error(format!("connect {}: {e}", account(i)));
            None
        }
        Err(_) => {
            ctx.counters
                .error(format!("connect {}: timed out", account(i)));
            None
        }
    }
}

/// Before anything is measured (see `run::WARM_UP_ROOM`): the first two accounts log in,
/// join a room of their own, one sends a message the other receives, both part and close.
/// A failure is counted as an error: the run's figures would then include the one-off costs.
async fn warm_up(ctx: &Arc<Ctx>, t: &ConclaveTarget) {
    let attempt = async {
        let mut clients = Vec::new();
        for i in 0..2 {
            let c = match Client::connect(options(t, i, t.register)).await {
                Err(ClientError::Server(e)) if t.register && e.code == ErrorCode::NameTaken => {
                    Client::connect(options(t, i, false)).await
                }
                other => other,
            };
            clients.push(c.map_err(|e| format!("connect {}: {e}", account(i)))?);
        }
        let room = crate::run::WARM_UP_ROOM;
        for (client, _, _) in &clients {
            let joined = match client.join(room, None).await {
                Err(ClientError::Server(e)) if e.code == ErrorCode::NoSuchRoom => {
                    match client.create_room(room, false, None).await {
                        Err(ClientError::Server(e)) if e.code == ErrorCode::RoomExists => {}
                        other => other.map_err(|e| format!("create {room}: {e}"))?,
                    }
                    client.join(room, None).await
                }
                other => other,
            };
            joined.map_err(|e| format!("join {room}: {e}"))?;
        }
        let sender = clients[0].0.clone();
        let receiver = &mut clients[1].1;
        sender
            .send_to_room(room, "warm-up", &[])
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match receiver.recv().await {
                Some(ClientEvent::Server(Event::Message(m))) if m.from == account(0) => break,
                Some(ClientEvent::Disconnected { message, .. }) => {
                    return Err(format!("disconnected: {message}"));
                }
                Some(_) => {}
                None => return Err("the connection ended".to_string()),
            }
        }
        for (client, _, _) in &clients {
            client.part(room).await.map_err(|e| format!("part: {e}"))?;
            client.close();
        }
        Ok::<(), String>(())
    };
    match timeout_at(ctx.bounded(CONNECT_TIMEOUT + JOIN_TIMEOUT), attempt).await {
        Ok(Ok(())) => tokio::time::sleep_until(ctx.bounded(crate::run::WARM_UP_SETTLE)).await,
        Ok(Err(e)) => ctx.counters.error(format!("warm-up: {e}")),
        Err(_) => ctx.counters.error("warm-up: timed out"),
    }
}

/// A raw member: connects, logs in, joins its room, then reads in its own task.
async fn connect_raw(
    ctx: &Arc<Ctx>,
    t: &ConclaveTarget,
    net: &RawNet,
    i: usize,
    room: usize,
) -> Option<Member> {
    let name = ctx.room_name(room, false);
    let attempt = async {
        let mut conn = open_account(net, i, t.register)
            .await
            .map_err(|(_, e)| format!("connect {}: {e}", account(i)))?;
        ctx.connected.fetch_add(1, Ordering::Relaxed);
        let mut next_id = 2;
        let mut call = async |conn: &mut RawConn, req: Request| {
            next_id += 1;
            raw_request(conn, next_id, req).await
        };
        let join = || Request::Join {
            room: name.clone(),
            password: None,
        };
        match call(&mut conn, join()).await? {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::NoSuchRoom => {
                let create = Request::CreateRoom {
                    room: name.clone(),
                    private: false,
                    password: None,
                };
                match call(&mut conn, create).await? {
                    Ok(_) => {}
                    // Someone else made it meanwhile.
                    Err(e) if e.code == ErrorCode::RoomExists => {}
                    Err(e) => return Err(format!("create room {name}: {}", e.message)),
                }
                if let Err(e) = call(&mut conn, join()).await? {
                    return Err(format!("join {name}: {}", e.message));
                }
            }
            Err(e) => return Err(format!("join {name}: {}", e.message)),
        }
        Ok(conn)
    };
    match timeout_at(ctx.bounded(CONNECT_TIMEOUT + JOIN_TIMEOUT), attempt).await {
        Ok(Ok(conn)) => {
            ctx.joined[room].fetch_add(1, Ordering::Relaxed);
            let receiver = tokio::spawn(raw_loop(conn, ctx.clone(), ctx.node_of(i)));
            Some(Member::Raw { receiver })
        }
        Ok(Err(e)) => {
            ctx.counters.error(e);
            None
        }
        Err(_) => {
            ctx.counters
                .error(format!("connect and join {}: timed out", account(i)));
            None
        }
    }
}

/// Drains a member's events until the run stops, recording this run's messages.
async fn receive(mut events: Events, ctx: Arc<Ctx>, node: Option<usize>) -> Recorder {
    let mut rec = Recorder::default();
    loop {
        let event = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            e = events.recv() => e,
        };
        match event {
            Some(ClientEvent::Server(Event::Message(m))) => {
                // The library reads the socket itself: no kernel stamp here.
                record(&ctx, &mut rec, node, m.body.as_text(), None);
            }
            Some(ClientEvent::Disconnected {
                reason, message, ..
            }) => {
                if !ctx.stop.is_cancelled() {
                    ctx.counters
                        .disconnect(format!("disconnected ({}): {message}", reason.as_str()));
                }
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    rec
}

fn record(
    ctx: &Ctx,
    rec: &mut Recorder,
    node: Option<usize>,
    text: Option<&str>,
    arrived_ago_ns: Option<u64>,
) {
    record_bytes(
        ctx,
        rec,
        node,
        text.map(str::as_bytes).unwrap_or_default(),
        arrived_ago_ns,
    );
}

/// Records a delivery to a receiver whose connection starts at server address `node` (with
/// several addresses): the stamp says the sender's, so whether the message crossed nodes.
fn record_bytes(
    ctx: &Ctx,
    rec: &mut Recorder,
    node: Option<usize>,
    text: &[u8],
    arrived_ago_ns: Option<u64>,
) {
    match parse_stamp_from(ctx.run_id, text) {
        Some((sent_ns, from)) => {
            let crossed = node.zip(from).map(|(mine, theirs)| mine != theirs);
            rec.record_split(sent_ns, arrived_ago_ns, crossed);
            ctx.counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        None => {
            ctx.counters.stale.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn traffic(ctx: Arc<Ctx>, t: Arc<ConclaveTarget>) {
    let scn = ctx.scn.clone();
    let net = match RawNet::new(&t).await {
        Ok(n) => Arc::new(n),
        Err(e) => {
            ctx.counters.error(e);
            return;
        }
    };
    let senders: std::collections::HashSet<usize> =
        (0..scn.senders).map(|k| scn.sender_client(k)).collect();
    ctx.mark(Phase::ConnectStart);
    let mut connected: Vec<(usize, Option<Member>)> = futures_util::stream::iter(0..scn.clients)
        .map(|i| {
            let (ctx, t, net) = (ctx.clone(), t.clone(), net.clone());
            let lib = t.full_clients || senders.contains(&i);
            let room = scn.room_of(i);
            async move {
                if ctx.past_deadline() {
                    return (i, None);
                }
                let member = match room {
                    Some(room) if !lib => connect_raw(&ctx, &t, &net, i, room).await,
                    _ => connect_lib(&ctx, &t, i).await,
                };
                (i, member)
            }
        })
        .buffer_unordered(scn.connect_parallel)
        .collect()
        .await;
    connected.sort_by_key(|(i, _)| *i);
    let members: Vec<Option<Member>> = connected.into_iter().map(|(_, m)| m).collect();
    ctx.mark(Phase::Connected);

    join_rooms(&ctx, &members).await;
    ctx.mark(Phase::Joined);

    if !ctx.past_deadline() {
        tokio::time::sleep_until(ctx.bounded(SETTLE)).await;
        ctx.mark(Phase::TrafficStart);
        let mut senders = Vec::new();
        for k in 0..scn.senders {
            let c = scn.sender_client(k);
            match (&members[c], scn.room_of(c)) {
                (Some(Member::Lib { client, .. }), Some(room)) => {
                    senders.push(tokio::spawn(send_loop(
                        client.clone(),
                        ctx.clone(),
                        room,
                        k,
                    )));
                }
                _ => ctx
                    .counters
                    .error(format!("sender {} is not connected", account(c))),
            }
        }
        for s in senders {
            // Senders stop at the deadline by themselves; this only bounds a stuck one.
            let left = ctx.time_left() + REQUEST_TIMEOUT;
            if tokio::time::timeout(left, s).await.is_err() {
                ctx.counters.error("a sender did not finish in time");
            }
        }
        ctx.await_deliveries().await;
        ctx.mark(Phase::TrafficEnd);
    }

    ctx.stop.cancel();
    let until = Instant::now() + COLLECT_TIMEOUT;
    for m in members.into_iter().flatten() {
        let receiver = match m {
            Member::Lib { client, receiver } => {
                client.close();
                receiver
            }
            Member::Raw { receiver } => receiver,
        };
        if let Ok(Ok(rec)) = timeout_at(until, receiver).await {
            ctx.merge_latency(&rec);
        }
    }
}

/// Joins the library members to their rooms (raw members joined as they connected). A room
/// that does not exist yet is created by whoever finds it missing.
async fn join_rooms(ctx: &Arc<Ctx>, members: &[Option<Member>]) {
    let scn = &ctx.scn;
    futures_util::stream::iter(members.iter().enumerate())
        .filter_map(|(i, m)| async move {
            match m {
                Some(Member::Lib { client, .. }) => Some((client, scn.room_of(i)?)),
                _ => None,
            }
        })
        .for_each_concurrent(scn.connect_parallel, |(client, r)| async move {
            let name = ctx.room_name(r, false);
            let join = async {
                match client.join(&name, None).await {
                    Err(ClientError::Server(e)) if e.code == ErrorCode::NoSuchRoom => {
                        match client.create_room(&name, false, None).await {
                            Ok(()) => {}
                            Err(ClientError::Server(e)) if e.code == ErrorCode::RoomExists => {}
                            Err(e) => return Err(e),
                        }
                        client.join(&name, None).await
                    }
                    other => other,
                }
            };
            match timeout_at(ctx.bounded(JOIN_TIMEOUT), join).await {
                Ok(Ok(_)) => {
                    ctx.joined[r].fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => ctx.counters.error(format!("join {name}: {e}")),
                Err(_) => ctx.counters.error(format!("join {name}: timed out")),
            }
        })
        .await;
}

/// One sender: `messages` sends to its room, at most `window` awaiting acknowledgement, paced
/// when a rate is set.
async fn send_loop(client: Client, ctx: Arc<Ctx>, room: usize, k: usize) {
    let node = ctx.node_of(ctx.scn.sender_client(k));
    let scn = &ctx.scn;
    let name = ctx.room_name(room, false);
    let pacer = Pacer::new(scn.rate, scn.sender_phase(k));
    let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
    let settle = |r: Result<Reply, ClientError>| match r {
        Ok(Reply::Sent { .. }) => {
            ctx.accepted[room].fetch_add(1, Ordering::Relaxed);
        }
        Ok(other) => ctx
            .counters
            .error(format!("send: unexpected reply {other:?}")),
        Err(e) => ctx.counters.error(format!("send: {e}")),
    };
    for i in 0..scn.messages {
        // Room in the window, and the message's time come.
        let due = pacer.due(i);
        loop {
            if ctx.past_deadline() {
                break;
            }
            if inflight.len() < scn.window && Instant::now() >= due {
                break;
            }
            tokio::select! {
                Some(r) = inflight.next(), if !inflight.is_empty() => settle(r),
                _ = tokio::time::sleep_until(due.min(ctx.deadline)), if inflight.len() < scn.window => {}
                _ = tokio::time::sleep_until(ctx.deadline) => {}
            }
        }
        if ctx.past_deadline() {
            break;
        }
        let text = stamp_text_from(ctx.run_id, now_ns(), scn.size_bytes, node);
        let req = Request::Send {
            target: Target::Room {
                room: name.clone(),
                except: Vec::new(),
            },
            body: Body::text(text),
            idempotency_key: None,
            refs: None,
        };
        match client.submit(req).await {
            Ok(pending) => {
                ctx.counters.sent.fetch_add(1, Ordering::Relaxed);
                inflight.push(PendingReply::reply(pending));
            }
            Err(e) => ctx.counters.error(format!("send: {e}")),
        }
    }
    // Each reply is bounded by the request timeout.
    while let Some(r) = inflight.next().await {
        settle(r);
    }
}

// ---- the raw client: idle connections and receivers -----------------------------------------

type RawConn = Framed<TlsStream<StampedTcp>, LengthDelimitedCodec>;

/// What every raw connection of a run shares.
struct RawNet {
    /// One per `--server` address; raw connection `i` uses number `i mod n`.
    addrs: Vec<SocketAddr>,
    tls: TlsConnector,
}

impl RawNet {
    async fn new(t: &ConclaveTarget) -> Result<RawNet, String> {
        let list = conclave_client::ServerList::parse(&t.server).map_err(|e| e.to_string())?;
        let mut addrs = Vec::new();
        for server in list.iter() {
            match tokio::net::lookup_host((server.host.as_str(), server.port))
                .await
                .map(|mut a| a.next())
            {
                Ok(Some(a)) => addrs.push(a),
                Ok(None) | Err(_) => {
                    return Err(format!("cannot resolve the server address {server}"));
                }
            }
        }
        let check = CertCheck::Fingerprint(t.fingerprint.clone());
        let tls = if t.classical_kx {
            net::classical_tls_config(check)
        } else {
            net::tls_config(check)
        }
        .map_err(|e| format!("TLS configuration: {e}"))?;
        Ok(RawNet {
            addrs,
            tls: TlsConnector::from(tls),
        })
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(RAW_MAX_FRAME_BYTES)
        .new_codec()
}

/// TCP (from a spread source address), TLS, hello, then one login or registration frame and
/// its reply. Err is the error code when the server refused, else a sentence.
async fn raw_open(
    net: &RawNet,
    i: usize,
    register: bool,
) -> Result<RawConn, (Option<ErrorCode>, String)> {
    let fail = |what: &str, e: &dyn std::fmt::Display| (None, format!("{what}: {e}"));
    let addr = net.addrs[i % net.addrs.len()];
    let source = net::source_ip(addr, i);
    let tcp = net::tcp_connect(addr, source)
        .await
        .map_err(|e| fail("TCP connect", &e))?;
    let name = rustls::pki_types::ServerName::try_from("conclave-bench")
        .map_err(|e| fail("server name", &e))?;
    let mut stream = net
        .tls
        .connect(name, tcp)
        .await
        .map_err(|e| fail("TLS", &e))?;
    stream
        .write_all(&hello::encode(PROTOCOL_VERSION, HelloStatus::Ok))
        .await
        .map_err(|e| fail("hello", &e))?;
    stream.flush().await.map_err(|e| fail("hello", &e))?;
    let mut theirs = [0u8; HELLO_BYTES];
    stream
        .read_exact(&mut theirs)
        .await
        .map_err(|e| fail("hello", &e))?;
    match hello::decode(&theirs) {
        Ok(h) if h.status == HelloStatus::Ok => {}
        Ok(_) => return Err((None, "the server refused our protocol version".into())),
        Err(e) => return Err(fail("hello", &e)),
    }
    let mut conn = Framed::new(stream, codec());
    let user = account(i);
    let password = BENCH_PASSWORD.to_string();
    let req = if register {
        Request::Register {
            user,
            password,
            server_password: None,
            invite_code: None,
        }
    } else {
        Request::Login {
            user,
            password,
            server_password: None,
            resume: Vec::new(),
        }
    };
    match raw_request(&mut conn, 1, req).await {
        Ok(Ok(_)) => Ok(conn),
        Ok(Err(e)) => Err((Some(e.code), format!("login: {}", e.message))),
        Err(e) => Err((None, format!("login: {e}"))),
    }
}

/// Opens a raw connection to account `i`; registering, it logs in instead when the account
/// exists (made by an earlier run).
async fn open_account(
    net: &RawNet,
    i: usize,
    register: bool,
) -> Result<RawConn, (Option<ErrorCode>, String)> {
    match raw_open(net, i, register).await {
        Err((Some(ErrorCode::NameTaken), _)) if register => raw_open(net, i, false).await,
        other => other,
    }
}

/// Sends one request and reads frames (dropping events) up to its reply.
async fn raw_request(
    conn: &mut RawConn,
    id: u64,
    req: Request,
) -> Result<Result<Reply, conclave_client::proto::ErrorBody>, String> {
    conn.send(Bytes::from(encode_client(&ClientFrame { id, req })))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match conn.next().await {
            Some(Ok(bytes)) => match decode_server(&bytes) {
                Ok(ServerFrame::Reply { id: got, result }) if got == id => return Ok(result),
                Ok(ServerFrame::Event(Event::Disconnect { message, .. })) => {
                    return Err(format!("disconnected: {message}"));
                }
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            },
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the server closed the connection".into()),
        }
    }
}

/// Keeps one raw connection until the run stops: records this run's messages, drops everything
/// else, pings now and then.
async fn raw_loop(mut conn: RawConn, ctx: Arc<Ctx>, node: Option<usize>) -> Recorder {
    let mut rec = Recorder::default();
    let arrival = conn.get_ref().get_ref().0.arrival();
    let mut next_ping = Instant::now() + IDLE_PING_EVERY;
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            frame = conn.next() => match frame {
                Some(Ok(bytes)) => if let Some(text) = crate::wire_view::message_text(&bytes) {
                    record_bytes(&ctx, &mut rec, node, text, arrival.age_ns());
                } else { match decode_server(&bytes) {
                    Ok(ServerFrame::Event(Event::Message(m))) => record(&ctx, &mut rec, node, m.body.as_text(), arrival.age_ns()),
                    Ok(ServerFrame::Event(Event::Disconnect { reason, message })) => {
                        ctx.counters.disconnect(format!("disconnected ({}): {message}", reason.as_str()));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        ctx.counters.disconnect(format!("undecodable frame: {e}"));
                        break;
                    }
                }},
                Some(Err(e)) => {
                    ctx.counters.disconnect(format!("connection: {e}"));
                    break;
                }
                None => {
                    ctx.counters.disconnect("connection closed by the server");
                    break;
                }
            },
            _ = tokio::time::sleep_until(next_ping) => {
                nonce += 1;
                let ping = encode_client(&ClientFrame { id: 1_000_000 + nonce, req: Request::Ping { nonce } });
                if conn.send(Bytes::from(ping)).await.is_err() {
                    ctx.counters.disconnect("connection: ping failed");
                    break;
                }
                next_ping += IDLE_PING_EVERY;
            }
        }
    }
    rec
}

async fn idle_connect(
    ctx: Arc<Ctx>,
    net: Arc<RawNet>,
    i: usize,
    register: bool,
) -> Option<JoinHandle<Recorder>> {
    if ctx.past_deadline() {
        return None;
    }
    match timeout_at(
        ctx.bounded(CONNECT_TIMEOUT),
        open_account(&net, i, register),
    )
    .await
    {
        Ok(Ok(conn)) => {
            ctx.connected.fetch_add(1, Ordering::Relaxed);
            Some(tokio::spawn(raw_loop(conn, ctx.clone(), ctx.node_of(i))))
        }
        Ok(Err((_, e))) => {
            ctx.counters.error(format!("connect {}: {e}", account(i)));
            None
        }
        Err(_) => {
            ctx.counters
                .error(format!("connect {}: timed out", account(i)));
            None
        }
    }
}

async fn idle(ctx: Arc<Ctx>, t: Arc<ConclaveTarget>) {
    let net = match RawNet::new(&t).await {
        Ok(n) => Arc::new(n),
        Err(e) => {
            ctx.counters.error(e);
            return;
        }
    };
    ctx.mark(Phase::ConnectStart);
    let held: Vec<JoinHandle<Recorder>> = futures_util::stream::iter(0..ctx.scn.clients)
        .map(|i| idle_connect(ctx.clone(), net.clone(), i, t.register))
        .buffer_unordered(ctx.scn.connect_parallel)
        .filter_map(|h| async move { h })
        .collect()
        .await;
    ctx.mark(Phase::Connected);
    ctx.hold().await;
    ctx.mark(Phase::Held);
    ctx.stop.cancel();
    let until = Instant::now() + COLLECT_TIMEOUT;
    for h in held {
        if timeout_at(until, h).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn connections_start_at_successive_addresses_of_the_list() {
        let list = "a:1,b:2,c:3";
        assert_eq!(spread(list, 0), "a:1,b:2,c:3");
        assert_eq!(spread(list, 1), "b:2,c:3,a:1");
        assert_eq!(spread(list, 5), "c:3,a:1,b:2");
        assert_eq!(spread("h:1", 7), "h:1");
        assert_eq!(spread("not an address:", 2), "not an address:");
    }
}
