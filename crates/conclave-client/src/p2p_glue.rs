//! Peer-to-peer transfers: the client's side of `"p2p": true`, on [`conclave_p2p`] (QUIC).
//!
//! Sender ([`send`]), given the file's name, hash and size: start a [`P2pSender`] (a fresh
//! certificate for this offer) on the address this host uses to reach the server, offer the
//! file with that address and the certificate's fingerprint, register the one-time tokens the
//! server returns (one per online recipient), run the caller's step after the offer (an
//! end-to-end file's description goes to the conversation there), and serve until every
//! recipient is settled: received it directly, declined it, or asked for the relay copy. The
//! relay copy is uploaded only when needed: at once when some recipient was offline at the
//! offer, otherwise when the first recipient asks for it ([`Event::FileRelayWanted`]).
//!
//! Recipient ([`fetch`]): connect to the sender's addresses within [`FileOptions::p2p_timeout`],
//! check the pinned fingerprint, present the token, receive into the part file (resuming it),
//! verify. Any failure returns why, and the caller falls back to the relay.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use conclave_p2p::{FetchRequest, P2pSender, SenderLimits, Window};
use conclave_proto::{Event, FileOffer, P2pInvite, P2pOffer, Reply, Request, Target};

use crate::files::{AfterOffer, Direction, FileOptions, FileSent, Prepared, Reporter};
use crate::{Client, ClientError};

fn window(opts: &FileOptions) -> Window {
    let w = opts.window.map(Window::uniform).unwrap_or_default();
    match opts
        .congestion
        .as_deref()
        .and_then(conclave_p2p::Congestion::parse)
    {
        Some(c) => w.with_congestion(c),
        None => w,
    }
}

fn p2p_err(message: impl Into<String>) -> ClientError {
    ClientError::File {
        code: "p2p_failed",
        message: message.into(),
    }
}

/// The local address this host uses to reach `server` (no packet is sent: a connected UDP
/// socket only picks a route).
async fn local_ip_towards(server: &str) -> Option<IpAddr> {
    let target = tokio::net::lookup_host(server).await.ok()?.next()?;
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any).await.ok()?;
    socket.connect(target).await.ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Sends `path` (offered as `file`) peer to peer (see the module documentation). Returns when
/// every recipient is settled, or [`FileOptions::p2p_linger`] has passed. `after_offer` runs
/// once the offer exists and the recipients' tokens are registered (so a recipient it tells
/// about the file can fetch at once), before any relay upload; if it fails, serving stops and
/// the send fails.
pub(crate) async fn send(
    client: &Client,
    path: &Path,
    target: Target,
    opts: FileOptions,
    file: Prepared,
    after_offer: Option<AfterOffer>,
) -> Result<FileSent, ClientError> {
    let Prepared { name, sha256, size } = file;
    let bind = match opts.p2p_bind {
        Some(b) => b,
        None => {
            let ip = local_ip_towards(&client.connected_to())
                .await
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
            SocketAddr::new(ip, 0)
        }
    };
    let limits = SenderLimits {
        lifetime: opts.p2p_linger,
        ..Default::default()
    };
    let sender = P2pSender::start(path, size, sha256, bind, window(&opts), limits)
        .await
        .map_err(|e| p2p_err(format!("cannot serve the file directly: {e}")))?;
    let addrs = match &opts.p2p_advertise {
        Some(a) => a.clone(),
        None => sender
            .local_addrs()
            .map_err(|e| p2p_err(format!("cannot serve the file directly: {e}")))?,
    };
    // Subscribe before the offer: a recipient may ask for the relay at once.
    let mut file_events = client.file_events();
    let reply = client
        .request(Request::FileOffer {
            target,
            name: name.clone(),
            size,
            sha256,
            p2p: Some(P2pOffer {
                addrs,
                fingerprint: sender.fingerprint(),
            }),
        })
        .await?;
    let Reply::FileCreated {
        file_id,
        chunk_size,
        uploaded,
        relay_needed,
        tokens,
        ..
    } = reply
    else {
        return Err(p2p_err("the server answered the offer unexpectedly"));
    };
    let mut waiting: HashSet<String> = HashSet::new();
    for grant in &tokens {
        sender
            .allow(grant.token, grant.user.clone())
            .map_err(|e| p2p_err(e.to_string()))?;
        waiting.insert(grant.user.clone());
    }
    if let Some(hook) = after_offer
        && let Err(e) = hook(file_id.clone()).await
    {
        sender.close();
        return Err(e);
    }
    let cancel = client.register_send(&file_id, &opts);
    let mut was_cancelled = false;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + opts.p2p_linger;
    let mut upload: Option<tokio::task::JoinHandle<Result<(), ClientError>>> = None;
    let start_upload = |upload: &mut Option<tokio::task::JoinHandle<Result<(), ClientError>>>| {
        if upload.is_none() {
            let (c, p, id, o) = (
                client.clone(),
                path.to_path_buf(),
                file_id.clone(),
                opts.clone(),
            );
            *upload = Some(tokio::spawn(async move {
                c.upload(&p, &id, size, chunk_size, uploaded, &o).await
            }));
        }
    };
    if relay_needed {
        start_upload(&mut upload);
    }
    let mut progress = sender.subscribe();
    let mut reporters: HashMap<String, Reporter> = HashMap::new();
    let mut upload_result: Option<Result<(), ClientError>> = None;
    loop {
        let upload_done = upload.is_none() || upload_result.is_some();
        if waiting.is_empty() && upload_done {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = cancel.cancelled() => {
                was_cancelled = true;
                break;
            }
            changed = progress.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = progress.borrow_and_update().clone();
                for p in now {
                    let r = reporters.entry(p.label.clone()).or_insert_with(|| {
                        Reporter::new(
                            opts.progress.clone(),
                            &file_id,
                            Direction::P2pSend,
                            Some(p.label.clone()),
                            size,
                            0,
                        )
                    });
                    r.report(p.sent, p.done);
                    if p.done {
                        waiting.remove(&p.label);
                    }
                }
            }
            event = file_events.recv() => match event {
                Ok(Event::FileRelayWanted { file_id: id, by }) if id == file_id => {
                    waiting.remove(&by);
                    start_upload(&mut upload);
                }
                Ok(Event::FileDeclined { file_id: id, by }) if id == file_id => {
                    waiting.remove(&by);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            result = async {
                match upload.as_mut() {
                    Some(h) if upload_result.is_none() => h.await,
                    _ => std::future::pending().await,
                }
            } => {
                upload_result = Some(result.unwrap_or_else(|_| Err(p2p_err("the upload task failed"))));
            }
        }
    }
    sender.close();
    client.sending().remove(&file_id);
    if was_cancelled {
        if let Some(h) = upload {
            h.abort();
        }
        return Err(crate::files::cancelled(&file_id));
    }
    let relayed = upload.is_some();
    if let Some(Err(e)) = upload_result {
        return Err(e);
    }
    if upload_result.is_none()
        && let Some(h) = upload
    {
        h.abort();
    }
    let elapsed = started.elapsed();
    Ok(FileSent {
        file_id,
        name,
        size,
        sha256: hex::encode(sha256),
        relayed,
        elapsed,
        throughput: size as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

/// Fetches `offer` directly from its sender into `part`. Returns the bytes that were already
/// there, or why it could not (the caller then uses the relay).
pub(crate) async fn fetch(
    offer: &FileOffer,
    invite: &P2pInvite,
    part: &Path,
    opts: &FileOptions,
) -> Result<u64, String> {
    let start = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut report = Reporter::new(
        opts.progress.clone(),
        &offer.file_id,
        Direction::P2pReceive,
        None,
        offer.size,
        start,
    );
    let req = FetchRequest {
        addrs: invite.addrs.clone(),
        fingerprint: invite.fingerprint,
        token: invite.token,
        size: offer.size,
        sha256: offer.sha256,
        dest_part: part.to_path_buf(),
        window: window(opts),
        connect_timeout: opts.p2p_timeout,
    };
    let stats = conclave_p2p::fetch(req, |bytes, _total| report.report(bytes, false))
        .await
        .map_err(|e| e.to_string())?;
    report.report(offer.size, true);
    tracing::debug!(
        file_id = offer.file_id,
        throughput = stats.throughput_bytes_per_sec,
        "direct transfer done"
    );
    Ok(stats.resumed_from)
}

/// How long a sender serves directly by default before it stops (recipients that have not
/// fetched by then use the relay).
pub const DEFAULT_P2P_LINGER: Duration = Duration::from_secs(600);
