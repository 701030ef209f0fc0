//! The bytes on the file stream: fixed-size headers, encoded and decoded without I/O.
//! The layout is documented byte by byte in the crate documentation.

/// First bytes of every header: "CVP2".
pub const MAGIC: [u8; 4] = *b"CVP2";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// The ALPN protocol name both sides require.
pub const ALPN: &[u8] = b"conclave-file/1";

/// Size of the request header (receiver to sender).
pub const REQUEST_LEN: usize = 48;
/// Size of the response header (sender to receiver).
pub const RESPONSE_LEN: usize = 56;
/// Size of the completion acknowledgement (receiver to sender, after the file).
pub const ACK_LEN: usize = 8;

/// QUIC application close codes the sender uses; the receiver maps them to [`crate::P2pError`].
pub mod close {
    /// The transfer completed and was verified.
    pub const DONE: u32 = 0;
    /// The sender is shutting down (closed or dropped).
    pub const SHUTDOWN: u32 = 1;
    /// The offer's lifetime ended.
    pub const EXPIRED: u32 = 2;
    /// The request was malformed or timed out.
    pub const BAD_REQUEST: u32 = 3;
    /// The sender could not read its file.
    pub const SENDER_FAILED: u32 = 5;
    /// A refusal: this plus the [`Status`](super::Status) byte, so the reason arrives even if
    /// the status header is lost with the close.
    pub const REFUSED_BASE: u32 = 16;

    /// The close code for a refusal with `status`.
    pub fn refused(status: super::Status) -> u32 {
        REFUSED_BASE + status as u32
    }

    /// The refusal a close code carries, if it is one.
    pub fn refusal(code: u64) -> Option<super::Status> {
        let byte = code.checked_sub(u64::from(REFUSED_BASE))?;
        super::Status::from_byte(u8::try_from(byte).ok()?)
    }
}

/// What the receiver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub token: [u8; 32],
    pub offset: u64,
}

/// The sender's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    BadToken = 1,
    TokenUsed = 2,
    TokenBusy = 3,
    BadOffset = 4,
    BadRequest = 5,
}

impl Status {
    pub(crate) fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::BadToken,
            2 => Status::TokenUsed,
            3 => Status::TokenBusy,
            4 => Status::BadOffset,
            5 => Status::BadRequest,
            _ => return None,
        })
    }
}

/// The response header: the status and, whatever the status, the offered file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub size: u64,
    pub offset: u64,
    pub sha256: [u8; 32],
}

/// The receiver's verdict after the file, which consumes the token when it is [`Ack::Verified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ack {
    Verified = 0,
    HashMismatch = 1,
}

/// Why a header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic,
    UnsupportedVersion(u8),
    BadField(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::BadMagic => write!(f, "the header does not start with CVP2"),
            DecodeError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "version {v} is not supported (this side speaks {VERSION})"
                )
            }
            DecodeError::BadField(field) => write!(f, "the header's {field} is invalid"),
        }
    }
}

fn check_prefix(buf: &[u8]) -> Result<(), DecodeError> {
    if buf[0..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if buf[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion(buf[4]));
    }
    Ok(())
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut buf = [0u8; REQUEST_LEN];
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4] = VERSION;
        // 5..8 reserved, zero.
        buf[8..40].copy_from_slice(&self.token);
        buf[40..48].copy_from_slice(&self.offset.to_be_bytes());
        buf
    }

    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<Request, DecodeError> {
        check_prefix(buf)?;
        if buf[5..8] != [0, 0, 0] {
            return Err(DecodeError::BadField("reserved bytes"));
        }
        let mut token = [0u8; 32];
        token.copy_from_slice(&buf[8..40]);
        Ok(Request {
            token,
            offset: u64_at(buf, 40),
        })
    }
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        let mut buf = [0u8; RESPONSE_LEN];
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4] = VERSION;
        buf[5] = self.status as u8;
        // 6..8 reserved, zero.
        buf[8..16].copy_from_slice(&self.size.to_be_bytes());
        buf[16..24].copy_from_slice(&self.offset.to_be_bytes());
        buf[24..56].copy_from_slice(&self.sha256);
        buf
    }

    pub fn decode(buf: &[u8; RESPONSE_LEN]) -> Result<Response, DecodeError> {
        check_prefix(buf)?;
        let status = Status::from_byte(buf[5]).ok_or(DecodeError::BadField("status"))?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&buf[24..56]);
        Ok(Response {
            status,
            size: u64_at(buf, 8),
            offset: u64_at(buf, 16),
            sha256,
        })
    }
}

impl Ack {
    pub fn encode(self) -> [u8; ACK_LEN] {
        let mut buf = [0u8; ACK_LEN];
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4] = VERSION;
        buf[5] = self as u8;
        buf
    }

    pub fn decode(buf: &[u8; ACK_LEN]) -> Result<Ack, DecodeError> {
        check_prefix(buf)?;
        match buf[5] {
            0 => Ok(Ack::Verified),
            1 => Ok(Ack::HashMismatch),
            _ => Err(DecodeError::BadField("verdict")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let req = Request {
            token: [7; 32],
            offset: 123_456_789,
        };
        assert_eq!(Request::decode(&req.encode()), Ok(req));
        let resp = Response {
            status: Status::TokenBusy,
            size: 1 << 40,
            offset: 5,
            sha256: [9; 32],
        };
        assert_eq!(Response::decode(&resp.encode()), Ok(resp));
        assert_eq!(
            Ack::decode(&Ack::HashMismatch.encode()),
            Ok(Ack::HashMismatch)
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut buf = Request {
            token: [1; 32],
            offset: 0,
        }
        .encode();
        buf[4] = 9;
        assert_eq!(
            Request::decode(&buf),
            Err(DecodeError::UnsupportedVersion(9))
        );
        buf[0] = b'X';
        assert_eq!(Request::decode(&buf), Err(DecodeError::BadMagic));
        let mut resp = Response {
            status: Status::Ok,
            size: 1,
            offset: 0,
            sha256: [0; 32],
        }
        .encode();
        resp[5] = 200;
        assert_eq!(
            Response::decode(&resp),
            Err(DecodeError::BadField("status"))
        );
    }
}
