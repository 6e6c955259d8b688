//! `Dropped`: packets the guest's firewall dropped, as the agent read them
//! from the guest kernel's log. Nothing of them reached the host (the guest
//! has no network card); the question only makes the record, a `packet`
//! record with the protocol, the destination and the count. Every field is
//! the guest's word, so each is checked before it is written.

use std::net::IpAddr;

use super::NetRecord;

/// Why such a packet goes nowhere, for the record's `reason`.
fn reason(proto: &str, ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        return "IPv6 goes nowhere (dropped in the guest)";
    }
    match proto {
        "udp" => "UDP other than DNS goes nowhere (dropped in the guest)",
        "icmp" | "icmpv6" => "ICMP goes nowhere (dropped in the guest)",
        _ => "only TCP and DNS leave the guest (dropped in the guest)",
    }
}

/// The record of a `Dropped` question, or `None` when a field is not one
/// the agent sends (the question is then refused unrecorded).
pub fn record(proto: &str, ip: &str, port: Option<u16>, count: u32) -> Option<NetRecord> {
    let ip: IpAddr = ip.parse().ok()?;
    if !capsem_proto::net::is_dropped_proto(proto) || count == 0 {
        return None;
    }
    let port = port.filter(|_| matches!(proto, "tcp" | "udp"));
    Some(NetRecord {
        time: capsem_host::vmstate::now_rfc3339(),
        kind: "packet",
        name: None,
        seen: None,
        guest_ip: Some(ip.to_string()),
        address: None,
        port,
        verdict: "deny",
        reason: reason(proto, ip).into(),
        bytes_out: 0,
        bytes_in: 0,
        duration_ms: 0,
        count: Some(u64::from(count)),
        proto: Some(proto.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_gets_its_reason() {
        let r = record("udp", "192.0.2.1", Some(9), 3).unwrap();
        assert_eq!(r.kind, "packet");
        assert_eq!(r.verdict, "deny");
        assert_eq!(r.guest_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!((r.port, r.count), (Some(9), Some(3)));
        assert_eq!(r.proto.as_deref(), Some("udp"));
        assert!(r.reason.starts_with("UDP other than DNS"), "{}", r.reason);
        let r = record("icmp", "192.0.2.1", None, 1).unwrap();
        assert!(r.reason.starts_with("ICMP"), "{}", r.reason);
        let r = record("udp", "2001:db8::1", Some(53), 1).unwrap();
        assert!(r.reason.starts_with("IPv6"), "{}", r.reason);
        let r = record("ip-47", "192.0.2.1", Some(1), 1).unwrap();
        assert_eq!(r.port, None, "a port only for TCP and UDP");
        assert!(r.reason.starts_with("only TCP and DNS"), "{}", r.reason);
    }

    #[test]
    fn what_the_agent_never_sends_is_refused() {
        assert!(record("udp", "not an address", Some(9), 1).is_none());
        assert!(record("udp", "192.0.2.1", Some(9), 0).is_none());
        assert!(record("sctp", "192.0.2.1", None, 1).is_none());
    }

    #[test]
    fn the_record_is_one_json_line_with_its_protocol() {
        let r = record("udp", "192.0.2.1", Some(9), 2).unwrap();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "packet");
        assert_eq!(v["proto"], "udp");
        assert_eq!(v["count"], 2);
    }
}
