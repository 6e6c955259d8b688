//! The addresses a connection may reach only when a rule names them: the
//! host itself, its networks, and everything that is not a public unicast
//! address. `--net open` allows "any public address", so this list is what
//! keeps open from meaning "and the host's LAN and cloud metadata too".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

/// Why an address is not public, for the connection's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    Unspecified,
    Loopback,
    Private,
    SharedCgnat,
    LinkLocal,
    CloudMetadata,
    Multicast,
    Broadcast,
    Documentation,
    Benchmarking,
    ReservedFuture,
    UniqueLocal,
    Translation,
}

impl Reserved {
    pub fn as_str(self) -> &'static str {
        match self {
            Reserved::Unspecified => "unspecified",
            Reserved::Loopback => "loopback",
            Reserved::Private => "private",
            Reserved::SharedCgnat => "shared (CGNAT)",
            Reserved::LinkLocal => "link-local",
            Reserved::CloudMetadata => "cloud metadata",
            Reserved::Multicast => "multicast",
            Reserved::Broadcast => "broadcast",
            Reserved::Documentation => "documentation",
            Reserved::Benchmarking => "benchmarking",
            Reserved::ReservedFuture => "reserved",
            Reserved::UniqueLocal => "unique local",
            Reserved::Translation => "translation",
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is that IPv4 address:
/// every check works on the canonical form, so the mapping cannot smuggle
/// 127.0.0.1 past a rule written for IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn net(s: &str) -> IpNet {
    // The table below is constant and tested (`the_table_parses`); a typo
    // would fall back to the single address 0.0.0.0, never to a wide net.
    s.parse()
        .unwrap_or_else(|_| IpNet::V4(Ipv4Net::from(Ipv4Addr::UNSPECIFIED)))
}

/// The ranges, most specific first (metadata is inside link-local).
const TABLE: &[(&str, Reserved)] = &[
    ("169.254.169.254/32", Reserved::CloudMetadata),
    ("fd00:ec2::254/128", Reserved::CloudMetadata),
    ("0.0.0.0/8", Reserved::Unspecified),
    ("127.0.0.0/8", Reserved::Loopback),
    ("10.0.0.0/8", Reserved::Private),
    ("172.16.0.0/12", Reserved::Private),
    ("192.168.0.0/16", Reserved::Private),
    ("100.64.0.0/10", Reserved::SharedCgnat),
    ("169.254.0.0/16", Reserved::LinkLocal),
    ("192.0.0.0/24", Reserved::ReservedFuture),
    ("192.0.2.0/24", Reserved::Documentation),
    ("198.51.100.0/24", Reserved::Documentation),
    ("203.0.113.0/24", Reserved::Documentation),
    ("198.18.0.0/15", Reserved::Benchmarking),
    ("224.0.0.0/4", Reserved::Multicast),
    ("255.255.255.255/32", Reserved::Broadcast),
    ("240.0.0.0/4", Reserved::ReservedFuture),
    ("::/128", Reserved::Unspecified),
    ("::1/128", Reserved::Loopback),
    ("64:ff9b::/96", Reserved::Translation),
    ("64:ff9b:1::/48", Reserved::Translation),
    ("100::/64", Reserved::ReservedFuture),
    ("2001:db8::/32", Reserved::Documentation),
    ("fc00::/7", Reserved::UniqueLocal),
    ("fe80::/10", Reserved::LinkLocal),
    ("ff00::/8", Reserved::Multicast),
];

/// Why `ip` is not a public unicast address, or `None` when it is.
pub fn reserved(ip: IpAddr) -> Option<Reserved> {
    let ip = canonical(ip);
    if let IpAddr::V6(v6) = ip {
        // Only 2000::/3 is allocated global unicast; the rest is reserved.
        if !is_global_unicast_block(v6) {
            return TABLE
                .iter()
                .find(|(n, _)| net(n).contains(&ip))
                .map(|(_, r)| *r)
                .or(Some(Reserved::ReservedFuture));
        }
    }
    TABLE
        .iter()
        .find(|(n, _)| net(n).contains(&ip))
        .map(|(_, r)| *r)
}

fn is_global_unicast_block(v6: Ipv6Addr) -> bool {
    v6.segments()[0] & 0xe000 == 0x2000
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(s: &str) -> Option<Reserved> {
        reserved(s.parse().unwrap())
    }

    #[test]
    fn the_table_parses() {
        for (n, _) in TABLE {
            assert!(n.parse::<IpNet>().is_ok(), "{n}");
        }
    }

    #[test]
    fn public_addresses_are_not_reserved() {
        assert_eq!(r("8.8.8.8"), None);
        assert_eq!(r("151.101.0.223"), None);
        assert_eq!(r("2606:4700::6810:84e5"), None);
        assert_eq!(r("172.32.0.1"), None);
        assert_eq!(r("100.128.0.1"), None);
    }

    #[test]
    fn the_host_and_its_networks_are_reserved() {
        assert_eq!(r("127.0.0.1"), Some(Reserved::Loopback));
        assert_eq!(r("127.255.0.9"), Some(Reserved::Loopback));
        assert_eq!(r("::1"), Some(Reserved::Loopback));
        assert_eq!(r("::ffff:127.0.0.1"), Some(Reserved::Loopback));
        assert_eq!(r("0.0.0.0"), Some(Reserved::Unspecified));
        assert_eq!(r("::"), Some(Reserved::Unspecified));
        assert_eq!(r("10.1.2.3"), Some(Reserved::Private));
        assert_eq!(r("172.16.0.1"), Some(Reserved::Private));
        assert_eq!(r("172.31.255.255"), Some(Reserved::Private));
        assert_eq!(r("192.168.1.1"), Some(Reserved::Private));
        assert_eq!(r("::ffff:192.168.1.1"), Some(Reserved::Private));
        assert_eq!(r("100.64.0.1"), Some(Reserved::SharedCgnat));
        assert_eq!(r("169.254.1.1"), Some(Reserved::LinkLocal));
        assert_eq!(r("fe80::1"), Some(Reserved::LinkLocal));
        assert_eq!(r("fd12::1"), Some(Reserved::UniqueLocal));
        assert_eq!(r("224.0.0.251"), Some(Reserved::Multicast));
        assert_eq!(r("ff02::1"), Some(Reserved::Multicast));
        assert_eq!(r("255.255.255.255"), Some(Reserved::Broadcast));
        assert_eq!(r("64:ff9b::7f00:1"), Some(Reserved::Translation));
    }

    #[test]
    fn cloud_metadata_is_named_as_such() {
        assert_eq!(r("169.254.169.254"), Some(Reserved::CloudMetadata));
        assert_eq!(r("fd00:ec2::254"), Some(Reserved::CloudMetadata));
    }

    #[test]
    fn unallocated_v6_is_reserved() {
        assert_eq!(r("4000::1"), Some(Reserved::ReservedFuture));
        assert_eq!(r("::2"), Some(Reserved::ReservedFuture));
    }

    #[test]
    fn canonical_unmaps_v4_in_v6() {
        let ip: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(canonical(ip), "10.0.0.1".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001::1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
