//! Host <-> guest messages on the network port ([`crate::guest::PORT_NET`]):
//! the agent's questions about the guest's egress, each on its own
//! connection, decided by capsem-process with the VM's policy.
//!
//! A connection carries exactly one question, the first frame:
//!
//! * [`NetToHost::Resolve`]: may the guest's resolver answer for this name?
//!   The host answers [`HostToNet::Resolved`] and closes.
//! * [`NetToHost::Connect`]: a guest TCP connection the agent intercepted:
//!   the name its synthetic address stands for (none for an address
//!   literal), the TLS SNI or HTTP Host the agent saw, the original address
//!   and port. The host answers [`HostToNet::Verdict`]; when it allows,
//!   the connection then carries the raw bytes of the guest's TCP stream
//!   both ways (the agent sends the bytes it peeked first), until either
//!   side closes. Denied: the host closes after the verdict.
//! * [`NetToHost::Dropped`]: packets the guest's firewall dropped (UDP
//!   other than DNS, ICMP, raw IP, IPv6), as the agent read them from the
//!   kernel's log, one destination each with how many were seen. The host
//!   records them and answers [`HostToNet::Verdict`] (always a denial).
//!
//! Each frame is read exactly (length prefix, then that many bytes), so no
//! relayed byte is ever taken for framing. Every string is bounded
//! ([`MAX_NET_NAME`]); frames are at most [`MAX_NET_FRAME`].

use serde::{Deserialize, Serialize};

/// Longest name or SNI/Host carried (a DNS name is at most 253 bytes).
pub const MAX_NET_NAME: usize = 255;
/// Longest verdict reason.
pub const MAX_NET_REASON: usize = 512;
/// Largest network-port frame either side accepts.
pub const MAX_NET_FRAME: usize = 2048;

/// What the agent asks, once per connection. The host decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum NetToHost {
    /// May the guest's resolver answer for `name`?
    Resolve { token: String, name: String },
    /// May this intercepted connection go out?
    Connect {
        token: String,
        /// The name the dialled synthetic address stands for; `None` when
        /// the guest dialled an address literal.
        name: Option<String>,
        /// The TLS SNI or HTTP/1 Host the guest sent first, if seen.
        seen: Option<String>,
        /// The original destination address, as text.
        ip: String,
        port: u16,
    },
    /// Packets to one destination that the guest's firewall dropped.
    Dropped {
        token: String,
        /// `udp`, `icmp`, `icmpv6`, `tcp` or `ip-N` (another IP protocol).
        proto: String,
        /// The destination address, as text.
        ip: String,
        /// The destination port (UDP and TCP only).
        port: Option<u16>,
        /// How many such packets this stands for (from 1).
        count: u32,
    },
}

/// The host's answers. The guest decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum HostToNet {
    /// Whether the name may be resolved (otherwise: NXDOMAIN).
    Resolved { allowed: bool },
    /// Whether the connection goes out, and the rule or reason that decided.
    Verdict { allowed: bool, reason: String },
}

/// A `Dropped` question's `proto`: `tcp`, `udp`, `icmp`, `icmpv6` or
/// `ip-N` (N a protocol number, at most three digits).
pub fn is_dropped_proto(proto: &str) -> bool {
    match proto {
        "tcp" | "udp" | "icmp" | "icmpv6" => true,
        other => other
            .strip_prefix("ip-")
            .is_some_and(|n| n.len() <= 3 && n.parse::<u8>().is_ok()),
    }
}

impl NetToHost {
    /// The session token the question carries.
    pub fn token(&self) -> &str {
        match self {
            Self::Resolve { token, .. }
            | Self::Connect { token, .. }
            | Self::Dropped { token, .. } => token,
        }
    }

    /// Whether every string is within the protocol's bounds.
    pub fn within_bounds(&self) -> bool {
        let ok = |s: &str| s.len() <= MAX_NET_NAME;
        match self {
            Self::Resolve { name, .. } => ok(name),
            Self::Connect { name, seen, ip, .. } => {
                name.as_deref().is_none_or(ok) && seen.as_deref().is_none_or(ok) && ok(ip)
            }
            Self::Dropped {
                proto, ip, count, ..
            } => is_dropped_proto(proto) && ok(ip) && *count >= 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Codec, NetGuest, NetHost};

    fn to_host(msg: &NetToHost) -> NetToHost {
        let frame = Codec::<NetGuest>::encode(msg).unwrap();
        let mut host = Codec::<NetHost>::new();
        host.feed(&frame).unwrap();
        host.next_message().unwrap().unwrap()
    }

    #[test]
    fn round_trip_and_roles() {
        for msg in [
            NetToHost::Resolve {
                token: "ab".into(),
                name: "pypi.org".into(),
            },
            NetToHost::Connect {
                token: "ab".into(),
                name: Some("pypi.org".into()),
                seen: None,
                ip: "198.18.0.1".into(),
                port: 443,
            },
            NetToHost::Dropped {
                token: "ab".into(),
                proto: "udp".into(),
                ip: "192.0.2.1".into(),
                port: Some(9),
                count: 3,
            },
        ] {
            assert_eq!(to_host(&msg), msg);
            assert!(msg.within_bounds());
            assert_eq!(msg.token(), "ab");
        }
        let v = HostToNet::Verdict {
            allowed: false,
            reason: "no rule allows it".into(),
        };
        let frame = Codec::<NetHost>::encode(&v).unwrap();
        let mut guest = Codec::<NetGuest>::new();
        guest.feed(&frame).unwrap();
        assert_eq!(guest.next_message().unwrap(), Some(v));
    }

    #[test]
    fn bounds() {
        let long = NetToHost::Resolve {
            token: "t".into(),
            name: "a".repeat(MAX_NET_NAME + 1),
        };
        assert!(!long.within_bounds());
        let seen = NetToHost::Connect {
            token: "t".into(),
            name: None,
            seen: Some("a".repeat(MAX_NET_NAME + 1)),
            ip: "1.2.3.4".into(),
            port: 1,
        };
        assert!(!seen.within_bounds());
        let dropped = |proto: &str, count| NetToHost::Dropped {
            token: "t".into(),
            proto: proto.into(),
            ip: "192.0.2.1".into(),
            port: None,
            count,
        };
        assert!(dropped("ip-47", 1).within_bounds());
        assert!(!dropped("udp", 0).within_bounds());
        for bad in ["", "UDP", "ip-", "ip-256", "ip-0047", "sctp", "udp\n"] {
            assert!(!dropped(bad, 1).within_bounds(), "{bad:?}");
        }
    }

    #[test]
    fn golden_resolve() {
        let frame = Codec::<NetGuest>::encode(&NetToHost::Resolve {
            token: "t".into(),
            name: "a.b".into(),
        })
        .unwrap();
        // {"t":"resolve","c":{"token":"t","name":"a.b"}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x1f\x82\xa1t\xa7resolve\xa1c\x82\xa5token\xa1t\xa4name\xa3a.b".to_vec()
        );
    }

    #[test]
    fn golden_connect() {
        let frame = Codec::<NetGuest>::encode(&NetToHost::Connect {
            token: "t".into(),
            name: Some("a.b".into()),
            seen: None,
            ip: "198.18.0.1".into(),
            port: 80,
        })
        .unwrap();
        // {"t":"connect","c":{"token":"t","name":"a.b","seen":nil,"ip":"198.18.0.1","port":80}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x39\x82\xa1t\xa7connect\xa1c\x85\xa5token\xa1t\xa4name\xa3a.b\xa4seen\xc0\xa2ip\xaa198.18.0.1\xa4port\x50".to_vec()
        );
    }

    #[test]
    fn golden_dropped() {
        let frame = Codec::<NetGuest>::encode(&NetToHost::Dropped {
            token: "t".into(),
            proto: "udp".into(),
            ip: "192.0.2.1".into(),
            port: Some(9),
            count: 2,
        })
        .unwrap();
        // {"t":"dropped","c":{"token":"t","proto":"udp","ip":"192.0.2.1","port":9,"count":2}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x3a\x82\xa1t\xa7dropped\xa1c\x85\xa5token\xa1t\xa5proto\xa3udp\xa2ip\xa9192.0.2.1\xa4port\x09\xa5count\x02".to_vec()
        );
    }

    #[test]
    fn golden_answers() {
        let frame = Codec::<NetHost>::encode(&HostToNet::Resolved { allowed: true }).unwrap();
        // {"t":"resolved","c":{"allowed":true}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x18\x82\xa1t\xa8resolved\xa1c\x81\xa7allowed\xc3".to_vec()
        );
        let frame = Codec::<NetHost>::encode(&HostToNet::Verdict {
            allowed: false,
            reason: "no".into(),
        })
        .unwrap();
        // {"t":"verdict","c":{"allowed":false,"reason":"no"}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x21\x82\xa1t\xa7verdict\xa1c\x82\xa7allowed\xc2\xa6reason\xa2no"
                .to_vec()
        );
    }
}
