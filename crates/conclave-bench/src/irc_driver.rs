//! Driving an IRC server over TLS with the same workloads, for comparison: a minimal client
//! that registers (NICK/USER, then waits for 001), joins one channel, sends PRIVMSG, answers
//! PING and reads everything else as fast as it comes.
//!
//! Per connection: the registration is done inline, then a reader task (lines in, PONGs out,
//! message latencies recorded) and a writer task (lines from a bounded channel, written in
//! batches). A sender pushes its PRIVMSGs into that channel: the channel and TCP push back, so a
//! sender at full speed goes as fast as the server reads.
//!
//! IRC has no acknowledgements: a message counts as sent once it is handed to the connection,
//! and the expected deliveries are the sent messages times the other members of the channel
//! (an IRC server does not echo a PRIVMSG to its sender).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::measure::{Recorder, now_ns, parse_stamp, stamp_text};
use crate::net;
use crate::run::{CONNECT_TIMEOUT, Ctx, JOIN_TIMEOUT, Pacer, Phase, SETTLE};
use crate::stamped::{Arrival, StampedTcp};

/// Longest line accepted from the server (IRC says 512; servers with tags send more).
const MAX_LINE_BYTES: usize = 16 * 1024;
/// Lines queued for one connection's writer.
const OUTBOUND_LINES: usize = 256;
/// Bytes gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Lines read during registration before giving up (MOTDs are long, not endless).
const MAX_REGISTRATION_LINES: usize = 10_000;
/// Bound on waiting for the tasks of a finished run to hand back their results.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(10);

type Stream = BufReader<TlsStream<StampedTcp>>;

/// The nick of client `i` (short: some servers allow only 9 characters).
pub fn nick(i: usize) -> String {
    format!("b{i}")
}

pub struct IrcTarget {
    pub addr: SocketAddr,
    pub tls: TlsConnector,
}

struct IrcConn {
    out: mpsc::Sender<String>,
    joined: Option<oneshot::Receiver<()>>,
    reader: JoinHandle<Recorder>,
}

/// A parsed line: prefix nick (if any), command, and the trailing parameter (after " :").
struct Line<'a> {
    nick: Option<&'a str>,
    command: &'a str,
    params: &'a str,
}

fn parse_line(line: &str) -> Option<Line<'_>> {
    let (nick, rest) = match line.strip_prefix(':') {
        Some(p) => {
            let (prefix, rest) = p.split_once(' ')?;
            (Some(prefix.split('!').next().unwrap_or(prefix)), rest)
        }
        None => (None, line),
    };
    let (command, params) = rest.split_once(' ').unwrap_or((rest, ""));
    Some(Line {
        nick,
        command,
        params,
    })
}

/// The trailing parameter: what follows the first " :" (or a leading ":").
fn trailing(params: &str) -> &str {
    if let Some(t) = params.strip_prefix(':') {
        return t;
    }
    params.split_once(" :").map(|(_, t)| t).unwrap_or("")
}

/// TCP, TLS, NICK/USER, and lines up to the welcome (001).
async fn register(target: &IrcTarget, i: usize) -> Result<Stream, String> {
    let source = net::source_ip(target.addr, i);
    let tcp = net::tcp_connect(target.addr, source)
        .await
        .map_err(|e| format!("TCP connect: {e}"))?;
    let name = rustls::pki_types::ServerName::try_from("irc-bench")
        .map_err(|e| format!("server name: {e}"))?;
    let tls = target
        .tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut s = BufReader::new(tls);
    let me = nick(i);
    s.write_all(format!("NICK {me}\r\nUSER {me} 0 * :conclave bench\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    for _ in 0..MAX_REGISTRATION_LINES {
        line.clear();
        let n = s
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection during registration".into());
        }
        let l = line.trim_end();
        let Some(p) = parse_line(l) else { continue };
        match p.command {
            "001" => return Ok(s),
            "PING" => {
                s.write_all(format!("PONG {}\r\n", p.params).as_bytes())
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                s.flush().await.map_err(|e| format!("write: {e}"))?;
            }
            "ERROR" | "432" | "433" | "436" | "463" | "465" => {
                return Err(format!("registration refused: {l}"));
            }
            _ => {}
        }
    }
    Err("no welcome (001) from the server".into())
}

/// Writes queued lines, gathering what is waiting into one write.
async fn write_loop(mut w: WriteHalf<Stream>, mut rx: mpsc::Receiver<String>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    while let Some(line) = rx.recv().await {
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(l) => {
                    buf.extend_from_slice(l.as_bytes());
                    buf.extend_from_slice(b"\r\n");
                }
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            // The reader sees the connection end and reports it.
            return;
        }
        buf.clear();
    }
    let _ = w.write_all(b"QUIT :bench over\r\n").await;
    let _ = w.flush().await;
}

/// Reads lines until the run stops: records this run's PRIVMSGs, answers PINGs, reports our
/// own JOIN.
async fn read_loop(
    r: ReadHalf<Stream>,
    arrival: Arrival,
    out: mpsc::Sender<String>,
    ctx: Arc<Ctx>,
    me: String,
    mut joined: Option<oneshot::Sender<()>>,
) -> Recorder {
    let mut rec = Recorder::default();
    let mut lines = FramedRead::new(r, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
    loop {
        let next = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            l = lines.next() => l,
        };
        let line = match next {
            Some(Ok(l)) => l,
            Some(Err(e)) => {
                if !ctx.stop.is_cancelled() {
                    ctx.counters.disconnect(format!("{me}: {e}"));
                }
                break;
            }
            None => {
                if !ctx.stop.is_cancelled() {
                    ctx.counters
                        .disconnect(format!("{me}: the server closed the connection"));
                }
                break;
            }
        };
        let Some(p) = parse_line(line.trim_end_matches('\r')) else {
            continue;
        };
        match p.command {
            "PRIVMSG" => match parse_stamp(ctx.run_id, trailing(p.params)) {
                Some(sent_ns) => {
                    rec.record(sent_ns, arrival.age_ns());
                    ctx.counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    ctx.counters.stale.fetch_add(1, Ordering::Relaxed);
                }
            },
            "PING" => {
                let _ = out.try_send(format!("PONG {}", p.params));
            }
            "JOIN" if p.nick == Some(me.as_str()) => {
                if let Some(tx) = joined.take() {
                    let _ = tx.send(());
                }
            }
            "ERROR" => {
                ctx.counters.disconnect(format!("{me}: {line}"));
                break;
            }
            // Refusals that concern the benchmark: cannot send, channel full, banned, ...
            "404" | "405" | "471" | "473" | "474" | "475" | "477" => {
                ctx.counters.error(format!("{me}: {line}"));
            }
            _ => {}
        }
    }
    rec
}

async fn connect(ctx: &Arc<Ctx>, target: &IrcTarget, i: usize) -> Option<IrcConn> {
    if ctx.past_deadline() {
        return None;
    }
    match timeout_at(ctx.bounded(CONNECT_TIMEOUT), register(target, i)).await {
        Ok(Ok(stream)) => {
            ctx.connected.fetch_add(1, Ordering::Relaxed);
            let arrival = stream.get_ref().get_ref().0.arrival();
            let (r, w) = tokio::io::split(stream);
            let (out, rx) = mpsc::channel(OUTBOUND_LINES);
            let (joined_tx, joined_rx) = oneshot::channel();
            tokio::spawn(write_loop(w, rx));
            let reader = tokio::spawn(read_loop(
                r,
                arrival,
                out.clone(),
                ctx.clone(),
                nick(i),
                Some(joined_tx),
            ));
            Some(IrcConn {
                out,
                joined: Some(joined_rx),
                reader,
            })
        }
        Ok(Err(e)) => {
            ctx.counters.error(format!("connect {}: {e}", nick(i)));
            None
        }
        Err(_) => {
            ctx.counters
                .error(format!("connect {}: timed out", nick(i)));
            None
        }
    }
}

/// Writes `lines` to `s` and reads until a line satisfies `until` (bounded in count).
async fn exchange(s: &mut Stream, lines: &str, until: impl Fn(&str) -> bool) -> Result<(), String> {
    s.write_all(lines.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    for _ in 0..MAX_REGISTRATION_LINES {
        line.clear();
        let n = s
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        if until(line.trim_end()) {
            return Ok(());
        }
    }
    Err("no answer".into())
}

/// The same warm-up as the Conclave driver's (`run::WARM_UP_ROOM`): the first two nicks
/// register, join a channel of their own, one sends a message the other receives, both part
/// and quit.
async fn warm_up(ctx: &Arc<Ctx>, target: &IrcTarget) {
    let chan = format!("#{}", crate::run::WARM_UP_ROOM);
    let attempt = async {
        let mut a = register(target, 0).await?;
        let mut b = register(target, 1).await?;
        for (s, i) in [(&mut a, 0), (&mut b, 1)] {
            let me = nick(i);
            exchange(s, &format!("JOIN {chan}\r\n"), |l| {
                parse_line(l).is_some_and(|p| p.command == "JOIN" && p.nick == Some(me.as_str()))
            })
            .await
            .map_err(|e| format!("join {chan}: {e}"))?;
        }
        a.write_all(format!("PRIVMSG {chan} :warm-up\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        a.flush().await.map_err(|e| format!("write: {e}"))?;
        exchange(&mut b, "", |l| {
            parse_line(l).is_some_and(|p| p.command == "PRIVMSG")
        })
        .await
        .map_err(|e| format!("receive: {e}"))?;
        for s in [&mut a, &mut b] {
            // QUIT: the server answers with ERROR and closes; either is the end.
            let _ = exchange(s, &format!("PART {chan}\r\nQUIT :warm-up done\r\n"), |l| {
                l.starts_with("ERROR")
            })
            .await;
        }
        Ok::<(), String>(())
    };
    match timeout_at(ctx.bounded(CONNECT_TIMEOUT + JOIN_TIMEOUT), attempt).await {
        Ok(Ok(())) => tokio::time::sleep_until(ctx.bounded(crate::run::WARM_UP_SETTLE)).await,
        Ok(Err(e)) => ctx.counters.error(format!("warm-up: {e}")),
        Err(_) => ctx.counters.error("warm-up: timed out"),
    }
}

/// Runs the scenario against an IRC server.
pub async fn run(ctx: Arc<Ctx>, target: Arc<IrcTarget>) {
    let scn = ctx.scn.clone();
    warm_up(&ctx, &target).await;
    ctx.mark(Phase::ConnectStart);
    let mut conns: Vec<(usize, Option<IrcConn>)> = futures_util::stream::iter(0..scn.clients)
        .map(|i| {
            let (ctx, target) = (ctx.clone(), target.clone());
            async move { (i, connect(&ctx, &target, i).await) }
        })
        .buffer_unordered(scn.connect_parallel)
        .collect()
        .await;
    conns.sort_by_key(|(i, _)| *i);
    let mut conns: Vec<Option<IrcConn>> = conns.into_iter().map(|(_, c)| c).collect();
    ctx.mark(Phase::Connected);

    if scn.is_idle() {
        ctx.hold().await;
        ctx.mark(Phase::Held);
    } else {
        join_channels(&ctx, &mut conns).await;
        ctx.mark(Phase::Joined);
        if !ctx.past_deadline() {
            tokio::time::sleep_until(ctx.bounded(SETTLE)).await;
            ctx.mark(Phase::TrafficStart);
            let mut senders = Vec::new();
            for k in 0..scn.senders {
                let c = scn.sender_client(k);
                match (&conns[c], scn.room_of(c)) {
                    (Some(conn), Some(room)) => senders.push(tokio::spawn(send_loop(
                        conn.out.clone(),
                        ctx.clone(),
                        room,
                        k,
                    ))),
                    _ => ctx
                        .counters
                        .error(format!("sender {} is not connected", nick(c))),
                }
            }
            for s in senders {
                let left = ctx.time_left() + Duration::from_secs(1);
                if tokio::time::timeout(left, s).await.is_err() {
                    ctx.counters.error("a sender did not finish in time");
                }
            }
            ctx.await_deliveries().await;
            ctx.mark(Phase::TrafficEnd);
        }
    }

    ctx.stop.cancel();
    let until = Instant::now() + COLLECT_TIMEOUT;
    for c in conns.into_iter().flatten() {
        drop(c.out);
        if let Ok(Ok(rec)) = timeout_at(until, c.reader).await {
            ctx.merge_latency(&rec);
        }
    }
}

async fn join_channels(ctx: &Arc<Ctx>, conns: &mut [Option<IrcConn>]) {
    let scn = &ctx.scn;
    futures_util::stream::iter(conns.iter_mut().enumerate())
        .filter_map(|(i, c)| async move { Some((c.as_mut()?, scn.room_of(i)?)) })
        .for_each_concurrent(scn.connect_parallel, |(c, r)| async move {
            let chan = ctx.room_name(r, true);
            let Some(joined) = c.joined.take() else {
                return;
            };
            if c.out.send(format!("JOIN {chan}")).await.is_err() {
                ctx.counters.error(format!("join {chan}: connection gone"));
                return;
            }
            match timeout_at(ctx.bounded(JOIN_TIMEOUT), joined).await {
                Ok(Ok(())) => {
                    ctx.joined[r].fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => ctx.counters.error(format!("join {chan}: connection gone")),
                Err(_) => ctx.counters.error(format!("join {chan}: timed out")),
            }
        })
        .await;
}

async fn send_loop(out: mpsc::Sender<String>, ctx: Arc<Ctx>, room: usize, k: usize) {
    let scn = &ctx.scn;
    let chan = ctx.room_name(room, true);
    let pacer = Pacer::new(scn.rate, scn.sender_phase(k));
    for i in 0..scn.messages {
        let due = pacer.due(i);
        if Instant::now() < due {
            tokio::time::sleep_until(due.min(ctx.deadline)).await;
        }
        if ctx.past_deadline() {
            break;
        }
        let text = stamp_text(ctx.run_id, now_ns(), scn.size_bytes);
        let sent = tokio::select! {
            r = out.send(format!("PRIVMSG {chan} :{text}")) => r.is_ok(),
            _ = tokio::time::sleep_until(ctx.deadline) => false,
        };
        if !sent {
            if !ctx.past_deadline() {
                ctx.counters
                    .error(format!("send to {chan}: connection gone"));
            }
            break;
        }
        ctx.counters.sent.fetch_add(1, Ordering::Relaxed);
        ctx.accepted[room].fetch_add(1, Ordering::Relaxed);
    }
    // A PING after the last message, as clients send now and then. Without it ngircd (GnuTLS)
    // was seen leaving the sender's last lines unread in its TLS buffer until the connection's
    // next activity.
    let _ = out.try_send("PING :bench-done".to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_parsed() {
        let p = parse_line(":b3!~b3@localhost PRIVMSG #bench-0 :cb 1 2 xx").unwrap();
        assert_eq!(p.nick, Some("b3"));
        assert_eq!(p.command, "PRIVMSG");
        assert_eq!(trailing(p.params), "cb 1 2 xx");
        let ping = parse_line("PING :irc.example").unwrap();
        assert_eq!(
            (ping.nick, ping.command, ping.params),
            (None, "PING", ":irc.example")
        );
        let join = parse_line(":b1!b1@h JOIN :#bench-0").unwrap();
        assert_eq!((join.nick, join.command), (Some("b1"), "JOIN"));
        let welcome = parse_line(":irc.local 001 b1 :Welcome").unwrap();
        assert_eq!(welcome.command, "001");
    }
}
