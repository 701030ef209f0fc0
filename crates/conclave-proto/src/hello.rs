//! The version exchange: the first 8 bytes each side sends after the TLS handshake.
//!
//! It is deliberately not a postcard frame, so that any future version can still read it and
//! answer "unsupported version" clearly instead of failing to decode.
//!
//! Layout: `b"CNCL"`, the protocol version (u16, big endian), a status (u16, big endian; always 0
//! from the client).

/// Bytes of a hello.
pub const HELLO_BYTES: usize = 8;

/// Magic prefix of every hello.
pub const MAGIC: [u8; 4] = *b"CNCL";

/// Status of the server's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloStatus {
    /// The versions match; frames follow.
    Ok,
    /// The server does not speak the client's version; it closes the connection.
    UnsupportedVersion,
}

impl HelloStatus {
    fn to_u16(self) -> u16 {
        match self {
            HelloStatus::Ok => 0,
            HelloStatus::UnsupportedVersion => 1,
        }
    }
}

/// A decoded hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub status: HelloStatus,
}

/// Why a hello could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("the peer is not speaking the Conclave protocol (bad magic bytes)")]
    BadMagic,
    #[error("the peer sent an unknown hello status {0}")]
    BadStatus(u16),
}

/// Encodes a hello.
pub fn encode(version: u16, status: HelloStatus) -> [u8; HELLO_BYTES] {
    let mut out = [0u8; HELLO_BYTES];
    out[..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&version.to_be_bytes());
    out[6..8].copy_from_slice(&status.to_u16().to_be_bytes());
    out
}

/// Decodes a hello.
pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Result<Hello, HelloError> {
    if bytes[..4] != MAGIC {
        return Err(HelloError::BadMagic);
    }
    let version = u16::from_be_bytes([bytes[4], bytes[5]]);
    let status = match u16::from_be_bytes([bytes[6], bytes[7]]) {
        0 => HelloStatus::Ok,
        1 => HelloStatus::UnsupportedVersion,
        other => return Err(HelloError::BadStatus(other)),
    };
    Ok(Hello { version, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for status in [HelloStatus::Ok, HelloStatus::UnsupportedVersion] {
            let h = decode(&encode(7, status)).expect("decodes");
            assert_eq!(h, Hello { version: 7, status });
        }
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(decode(b"GET / HT"), Err(HelloError::BadMagic));
        let mut b = encode(1, HelloStatus::Ok);
        b[7] = 9;
        assert_eq!(decode(&b), Err(HelloError::BadStatus(9)));
    }
}
