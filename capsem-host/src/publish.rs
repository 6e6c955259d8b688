//! Published ports (`-p [HOST_IP:]HOST_PORT:GUEST_PORT`): the [`Publish`]
//! that `vm.json` records and capsem-process receives as `--publish`, in
//! one canonical spelling ([`Publish::to_arg`], always with the address)
//! that [`Publish::parse`] reads back.
//!
//! | spelling | meaning |
//! |---|---|
//! | `8080:8000` | host 127.0.0.1:8080 to the guest's localhost:8000 |
//! | `0.0.0.0:8080:8000` | every host IPv4 address, port 8080 |
//! | `[::1]:8080:8000` | an IPv6 address, in brackets |

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Most published ports one VM takes.
pub const MAX_PUBLISH: usize = 32;
/// Longest `-p` value looked at (an IPv6 address, two ports and brackets
/// fit in well under this).
pub const MAX_SPEC_LEN: usize = 64;
/// The host address when the spec names none.
pub const DEFAULT_HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Publish {
    /// The host address capsem-process listens on.
    pub host_ip: IpAddr,
    pub host_port: u16,
    /// The port on the guest's 127.0.0.1 that each connection is relayed to.
    pub guest_port: u16,
}

/// Why a published-port spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("expected [HOST_IP:]HOST_PORT:GUEST_PORT (an IPv6 HOST_IP in brackets)")]
    Form,
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("{0:?} is not a port (1 to 65535)")]
    Port(String),
    #[error("port 0 cannot be published")]
    Zero,
}

impl Publish {
    /// Parses `[HOST_IP:]HOST_PORT:GUEST_PORT`; the address defaults to
    /// [`DEFAULT_HOST_IP`].
    pub fn parse(spec: &str) -> Result<Self, PublishError> {
        if spec.len() > MAX_SPEC_LEN {
            return Err(PublishError::Form);
        }
        let (ip, rest) = if let Some(bracketed) = spec.strip_prefix('[') {
            let (ip, rest) = bracketed.split_once("]:").ok_or(PublishError::Form)?;
            let ip: std::net::Ipv6Addr = ip
                .parse()
                .map_err(|_| PublishError::Address(ip.to_owned()))?;
            (IpAddr::V6(ip), rest)
        } else {
            match spec.matches(':').count() {
                1 => (DEFAULT_HOST_IP, spec),
                2 => {
                    let (ip, rest) = spec.split_once(':').ok_or(PublishError::Form)?;
                    let ip: Ipv4Addr = ip
                        .parse()
                        .map_err(|_| PublishError::Address(ip.to_owned()))?;
                    (IpAddr::V4(ip), rest)
                }
                _ => return Err(PublishError::Form),
            }
        };
        let (host, guest) = rest.split_once(':').ok_or(PublishError::Form)?;
        Ok(Self {
            host_ip: ip,
            host_port: port(host)?,
            guest_port: port(guest)?,
        })
    }

    /// The canonical spelling: `IP:HOST_PORT:GUEST_PORT` (`[IPv6]:...`),
    /// capsem-process's `--publish` value.
    pub fn to_arg(&self) -> String {
        self.to_string()
    }

    /// Where capsem-process listens.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

/// A decimal port, 1 to 65535 (digits only: no sign, no spaces).
fn port(s: &str) -> Result<u16, PublishError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PublishError::Port(s.to_owned()));
    }
    match s.parse::<u16>() {
        Ok(0) => Err(PublishError::Zero),
        Ok(p) => Ok(p),
        Err(_) => Err(PublishError::Port(s.to_owned())),
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SocketAddr brackets an IPv6 address.
        write!(f, "{}:{}", self.host_addr(), self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ip: &str, host: u16, guest: u16) -> Publish {
        Publish {
            host_ip: ip.parse().unwrap(),
            host_port: host,
            guest_port: guest,
        }
    }

    #[test]
    fn spellings() {
        assert_eq!(
            Publish::parse("8080:8000").unwrap(),
            p("127.0.0.1", 8080, 8000)
        );
        assert_eq!(
            Publish::parse("0.0.0.0:80:8000").unwrap(),
            p("0.0.0.0", 80, 8000)
        );
        assert_eq!(Publish::parse("[::1]:65535:1").unwrap(), p("::1", 65535, 1));
        for spec in ["127.0.0.2:1:2", "[::1]:8080:8000", "[fe80::1]:3:4"] {
            let got = Publish::parse(spec).unwrap();
            assert_eq!(got.to_arg(), spec);
            assert_eq!(Publish::parse(&got.to_arg()).unwrap(), got);
        }
        assert_eq!(
            Publish::parse("8080:8000").unwrap().to_arg(),
            "127.0.0.1:8080:8000"
        );
    }

    #[test]
    fn refusals() {
        use PublishError::*;
        let cases: &[(&str, PublishError)] = &[
            ("", Form),
            ("8080", Form),
            ("1:2:3:4", Form),
            ("::1:80:80", Form),
            ("[::1]80:80", Form),
            ("[::1]:80", Form),
            ("localhost:80:80", Address("localhost".into())),
            ("1.2.3:80:80", Address("1.2.3".into())),
            ("[1.2.3.4]:80:80", Address("1.2.3.4".into())),
            ("0:80", Zero),
            ("80:0", Zero),
            ("65536:80", Port("65536".into())),
            ("+80:80", Port("+80".into())),
            (" 80:80", Port(" 80".into())),
            ("80:80/tcp", Port("80/tcp".into())),
            (":80", Port("".into())),
        ];
        for (spec, want) in cases {
            assert_eq!(Publish::parse(spec).as_ref(), Err(want), "{spec:?}");
        }
        assert_eq!(Publish::parse(&"1".repeat(MAX_SPEC_LEN + 1)), Err(Form));
    }

    #[test]
    fn json_is_plain_fields() {
        let json = serde_json::to_string(&p("127.0.0.1", 8080, 8000)).unwrap();
        assert_eq!(
            json,
            r#"{"host_ip":"127.0.0.1","host_port":8080,"guest_port":8000}"#
        );
        let back: Publish = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p("127.0.0.1", 8080, 8000));
    }
}
