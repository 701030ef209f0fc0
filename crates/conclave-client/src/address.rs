//! The `--server` value: `host:port`, `host` (default port), `[ipv6]:port`.

use std::fmt;
use std::net::Ipv6Addr;

use conclave_proto::DEFAULT_PORT;

/// A server address as the user gave it, with the host folded to lower case. Its `Display`
/// form (`host:port`, `[v6]:port`) is the key in the known-servers file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
}

/// A `--server` value that is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a server address: {reason} (expected HOST:PORT, e.g. chat.example.org:{DEFAULT_PORT})"
)]
pub struct AddrError {
    pub input: String,
    pub reason: String,
}

impl ServerAddr {
    pub fn parse(input: &str) -> Result<ServerAddr, AddrError> {
        let fail = |reason: &str| AddrError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let s = input.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| fail("a '[' without its ']'"))?;
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(fail("the part in brackets is not an IPv6 address"));
            }
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| fail("expected ':' after ']'"))?,
                    ),
                ),
            }
        } else if s.parse::<Ipv6Addr>().is_ok() {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((_, port)) if port.contains(':') => {
                    return Err(fail("put an IPv6 address in brackets, like [::1]:7667"));
                }
                Some((host, port)) => (host, Some(port)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(fail("the host is missing"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(fail("the host contains a space or '/'"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| fail("the port must be a number from 1 to 65535"))?,
        };
        Ok(ServerAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        ServerAddr::parse(s).unwrap().to_string()
    }

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(ok("Chat.Example.org:7000"), "chat.example.org:7000");
        assert_eq!(ok("localhost"), format!("localhost:{DEFAULT_PORT}"));
        assert_eq!(ok("127.0.0.1:1"), "127.0.0.1:1");
        assert_eq!(ok("[::1]:9"), "[::1]:9");
        assert_eq!(ok("[::1]"), format!("[::1]:{DEFAULT_PORT}"));
        assert_eq!(ok("::1"), format!("[::1]:{DEFAULT_PORT}"));
        assert_eq!(ServerAddr::parse("[::1]:9").unwrap().host, "::1");
    }

    #[test]
    fn refuses_nonsense() {
        for bad in [
            "",
            ":7667",
            "host:",
            "host:0",
            "host:70000",
            "host:x",
            "fe80::1:zz",
            "[::1",
            "[x]:1",
            "a b:1",
        ] {
            assert!(ServerAddr::parse(bad).is_err(), "{bad:?}");
        }
    }
}
