//! The transfer window: how many bytes may be in flight between sender and receiver.
//!
//! A QUIC transfer is bounded by three windows, the smallest of which wins:
//!
//! - the receiver's **stream receive window** (`stream_receive_window`): bytes of one stream the
//!   receiver is willing to buffer ahead of what its application has read;
//! - the receiver's **connection receive window** (`receive_window`): the same, summed over all
//!   streams of the connection (one stream here, so it matters only when smaller);
//! - the sender's **send window** (`send_window`): bytes the sender keeps buffered, sent but not
//!   yet acknowledged plus written but not yet sent.
//!
//! The sender's **congestion controller** ([`Congestion`]) bounds the in-flight bytes further,
//! by its own estimate of the path: Cubic (quinn's default, and ours) and NewReno shrink their
//! window at every loss, so on a lossy path they, not the flow-control windows, set the pace;
//! BBR paces by measured bandwidth and round-trip time and suffers far less from random loss
//! (quinn marks its BBR as experimental). Throughput is at most `window / round-trip time`, so a
//! 20 ms one-way path (40 ms round trip) needs about 4 MiB of window for 100 MB/s.
//!
//! Both sides apply the same [`Window`]: the receiver's two receive windows and the sender's
//! send window are the ones that bound a transfer.

use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use crate::P2pError;

/// The smallest window accepted: below this a transfer crawls at any round-trip time.
pub const MIN_WINDOW_BYTES: u64 = 16 * 1024;
/// The largest window accepted: each connection may buffer this much, per side.
pub const MAX_WINDOW_BYTES: u64 = 1024 * 1024 * 1024;
/// The default of each window: 8 MiB, enough for about 200 MB/s at a 40 ms round trip, while a
/// few recipients in parallel still cost the sender only tens of MiB.
pub const DEFAULT_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// The congestion controller the sender runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// BBR (quinn's experimental implementation): far better under random loss.
    Bbr,
}

impl Congestion {
    /// Parses `cubic`, `newreno` or `bbr` (any case).
    pub fn parse(name: &str) -> Option<Congestion> {
        match name.to_ascii_lowercase().as_str() {
            "cubic" => Some(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Some(Congestion::NewReno),
            "bbr" => Some(Congestion::Bbr),
            _ => None,
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
        }
    }
}

/// The flow-control windows of a transfer, in bytes, and the congestion controller. See the
/// module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Bytes of the file stream the receiver buffers ahead of its reads.
    pub stream_receive_window: u64,
    /// Bytes of all streams of the connection the receiver buffers ahead of its reads.
    pub receive_window: u64,
    /// Bytes the sender keeps in flight or buffered, unacknowledged.
    pub send_window: u64,
    /// The congestion controller (it matters on the sending side). Default Cubic.
    pub congestion: Congestion,
}

impl Default for Window {
    /// [`DEFAULT_WINDOW_BYTES`] (8 MiB) for each of the three windows, Cubic.
    fn default() -> Self {
        Window::uniform(DEFAULT_WINDOW_BYTES)
    }
}

impl Window {
    /// The same size for all three windows, with the default congestion controller.
    pub fn uniform(bytes: u64) -> Window {
        Window {
            stream_receive_window: bytes,
            receive_window: bytes,
            send_window: bytes,
            congestion: Congestion::default(),
        }
    }

    /// The same windows with another congestion controller.
    pub fn with_congestion(self, congestion: Congestion) -> Window {
        Window { congestion, ..self }
    }

    /// Checks that every window lies within [`MIN_WINDOW_BYTES`]..=[`MAX_WINDOW_BYTES`].
    pub fn validate(&self) -> Result<(), P2pError> {
        for (field, bytes) in [
            ("stream_receive_window", self.stream_receive_window),
            ("receive_window", self.receive_window),
            ("send_window", self.send_window),
        ] {
            if !(MIN_WINDOW_BYTES..=MAX_WINDOW_BYTES).contains(&bytes) {
                return Err(P2pError::InvalidWindow {
                    field,
                    bytes,
                    min: MIN_WINDOW_BYTES,
                    max: MAX_WINDOW_BYTES,
                });
            }
        }
        Ok(())
    }

    /// Validates and writes the three windows and the congestion controller into `config`.
    pub fn apply(&self, config: &mut TransportConfig) -> Result<(), P2pError> {
        self.validate()?;
        // Both fit a VarInt (< 2^62) because validate() bounds them by 1 GiB.
        let varint = |field: &'static str, bytes: u64| {
            VarInt::from_u64(bytes).map_err(|_| P2pError::InvalidWindow {
                field,
                bytes,
                min: MIN_WINDOW_BYTES,
                max: MAX_WINDOW_BYTES,
            })
        };
        config
            .stream_receive_window(varint("stream_receive_window", self.stream_receive_window)?)
            .receive_window(varint("receive_window", self.receive_window)?)
            .send_window(self.send_window);
        match self.congestion {
            Congestion::Cubic => {
                config.congestion_controller_factory(Arc::new(CubicConfig::default()))
            }
            Congestion::NewReno => {
                config.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
            Congestion::Bbr => config.congestion_controller_factory(Arc::new(BbrConfig::default())),
        };
        Ok(())
    }

    /// A transport configuration with these windows, a maximum idle timeout of `idle_timeout`
    /// and keep-alives every third of it (so an idle but healthy connection never times out),
    /// allowing at most `max_bidi_streams` streams opened by the peer and none unidirectional.
    pub fn transport_config(
        &self,
        idle_timeout: Duration,
        max_bidi_streams: u32,
    ) -> Result<TransportConfig, P2pError> {
        let mut config = TransportConfig::default();
        self.apply(&mut config)?;
        let idle = IdleTimeout::try_from(idle_timeout).map_err(|_| {
            P2pError::Setup(format!(
                "the idle timeout {idle_timeout:?} is too long for QUIC; choose one under a day"
            ))
        })?;
        config
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(idle_timeout / KEEP_ALIVES_PER_IDLE_TIMEOUT))
            .max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
        Ok(config)
    }
}

/// Keep-alives per idle timeout: three, so two may be lost before the connection times out.
const KEEP_ALIVES_PER_IDLE_TIMEOUT: u32 = 3;
