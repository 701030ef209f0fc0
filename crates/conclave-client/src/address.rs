//! The `--server` value: `host:port`, `host` (default port), `[ipv6]:port`, or a list of
//! them separated by commas (the nodes of a cluster, tried in order).

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
    "{input:?} is not a server address: {reason} (expected HOST:PORT, or several separated by commas, e.g. chat.example.org:{DEFAULT_PORT})"
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

/// Most addresses one `--server` list may hold: a cluster's nodes, not a scan.
pub const MAX_SERVERS: usize = 16;

/// The addresses of one `--server` value, in the order given (at least one, at most
/// [`MAX_SERVERS`], no address twice). They are nodes of one cluster: they share one TLS
/// identity, so every one is checked against the same pin, remembered under the first
/// address ([`ServerList::key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList {
    addrs: Vec<ServerAddr>,
}

impl ServerList {
    /// Parses `HOST:PORT[,HOST:PORT…]` (spaces around the commas are ignored).
    pub fn parse(input: &str) -> Result<ServerList, AddrError> {
        let fail = |reason: String| AddrError {
            input: input.to_string(),
            reason,
        };
        let mut addrs: Vec<ServerAddr> = Vec::new();
        for (i, part) in input.split(',').enumerate() {
            if i >= MAX_SERVERS {
                return Err(fail(format!(
                    "more than {MAX_SERVERS} addresses; list the cluster's nodes, or put a \
                     balancer in front of them"
                )));
            }
            if part.trim().is_empty() && input.contains(',') {
                return Err(fail(format!(
                    "address {} of the list is empty (separate addresses with single commas)",
                    i + 1
                )));
            }
            let addr = ServerAddr::parse(part)?;
            if addrs.contains(&addr) {
                return Err(fail(format!("{addr} is listed twice")));
            }
            addrs.push(addr);
        }
        Ok(ServerList { addrs })
    }

    /// The first address: the one tried first, and the name the list is remembered by (its
    /// pinned fingerprint in `known_servers`, the terminal client's and the end-to-end
    /// device's state directories).
    pub fn key(&self) -> &ServerAddr {
        &self.addrs[0]
    }

    /// Address number `i`, counting round (`i` may exceed the length).
    pub fn get(&self, i: usize) -> &ServerAddr {
        &self.addrs[i % self.addrs.len()]
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    /// Never true (a list has at least one address); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &ServerAddr> {
        self.addrs.iter()
    }
}

impl fmt::Display for ServerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, addr) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// The name a `--server` value is remembered by: its first address, canonical (`host:port`);
/// the value itself when it does not parse (the connection will say why).
pub fn server_key(input: &str) -> String {
    ServerList::parse(input)
        .map(|l| l.key().to_string())
        .unwrap_or_else(|_| input.trim().to_string())
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

    #[test]
    fn lists_keep_their_order_and_are_known_by_the_first() {
        let l = ServerList::parse("B.example:1, [::1]:2 ,c").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(
            l.to_string(),
            format!("b.example:1,[::1]:2,c:{DEFAULT_PORT}")
        );
        assert_eq!(l.key().to_string(), "b.example:1");
        assert_eq!(l.get(4).to_string(), "[::1]:2");
        assert_eq!(ServerList::parse("h:1").unwrap().len(), 1);
        assert_eq!(server_key("H:1,h:2"), "h:1");
        assert_eq!(server_key("h:1"), "h:1");
    }

    #[test]
    fn lists_refuse_empty_repeated_and_too_many() {
        for bad in [
            "", "h:1,", ",h:1", "h:1,,h:2", "h:1,h:1", "h:1,H:1", "h:1,x:0",
        ] {
            assert!(ServerList::parse(bad).is_err(), "{bad:?}");
        }
        let twice = ServerList::parse("h:1,h:1").unwrap_err().to_string();
        assert!(twice.contains("h:1 is listed twice"), "{twice}");
        let many: Vec<String> = (1..=MAX_SERVERS + 1).map(|p| format!("h:{p}")).collect();
        assert!(ServerList::parse(&many[..MAX_SERVERS].join(",")).is_ok());
        let e = ServerList::parse(&many.join(",")).unwrap_err().to_string();
        assert!(e.contains("more than 16 addresses"), "{e}");
    }
}
