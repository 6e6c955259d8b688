//! `capsem.net=1`: the guest's redirected network, brought up before the
//! agent starts. There is no network card: `lo`, a `dummy` interface
//! ([`IFACE`], [`ADDR`]) holding the default route, and nftables rules
//! ([`rules`]) that redirect every TCP connection not to loopback to the
//! agent ([`PROXY_PORT`]) and every DNS query (UDP and TCP port 53) to its
//! resolver on 127.0.0.1:53, and drop all other egress (UDP, ICMP, raw,
//! IPv6), logging what they drop to nfnetlink_log group [`DROP_GROUP`]
//! for the agent's records. `/etc/resolv.conf` names the resolver. Uses the root's `ip` and
//! `nft` (images/packages.txt); a failure stops the boot, because a guest
//! whose rules did not load must not run with a network.

use std::io::Write;
use std::process::{Command, Stdio};

/// The dummy interface and its address.
pub const IFACE: &str = "capsem0";
pub const ADDR: &str = "10.0.2.15/24";
/// The agent's TCP side (`capsem-agent`'s `net::PROXY_ADDR`).
pub const PROXY_PORT: u16 = 849;
/// The agent's `net::drops::DROP_GROUP`, and its `SNAPLEN`.
pub const DROP_GROUP: u16 = 849;
const SNAPLEN: u32 = 48;
/// Dropped packets logged a second at most (the rest are dropped unlogged).
const LOG_PER_SEC: u32 = 1000;

/// Written `1` before the dummy interface exists, so that it gets no IPv6
/// at all: no IPv6 packet could leave anyway, and without this the kernel's
/// router solicitations to ff02::2 would be dropped, and recorded, in every
/// VM. (`lo` keeps `::1`.)
const NO_IPV6_ON_NEW_LINKS: &str = "/proc/sys/net/ipv6/conf/default/disable_ipv6";

/// What `/etc/resolv.conf` says.
const RESOLV_CONF: &str = "# written by capsem-init: the agent's resolver\nnameserver 127.0.0.1\n";

/// The ruleset. Redirected packets carry `ct status dnat` and pass the
/// filter; everything else leaving through a non-loopback interface is
/// logged (up to [`LOG_PER_SEC`]) and dropped.
pub fn rules() -> String {
    let log = format!(
        "limit rate {LOG_PER_SEC}/second burst {LOG_PER_SEC} packets log group {DROP_GROUP} snaplen {SNAPLEN}"
    );
    format!(
        "\
table ip capsem {{
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.0/8 accept
        udp dport 53 redirect to :53
        tcp dport 53 redirect to :53
        meta l4proto tcp redirect to :{PROXY_PORT}
    }}
    chain filter_out {{
        type filter hook output priority 0; policy drop;
        oifname \"lo\" accept
        ct status dnat accept
        {log}
    }}
}}
table ip6 capsem6 {{
    chain filter_out {{
        type filter hook output priority 0; policy drop;
        oifname \"lo\" accept
        {log}
    }}
}}
"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum NetUpError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot write /etc/resolv.conf")]
    Resolv(#[source] std::io::Error),
    #[error("cannot write {NO_IPV6_ON_NEW_LINKS}")]
    Ipv6(#[source] std::io::Error),
}

/// The `ip` commands, in order.
pub fn ip_commands() -> Vec<Vec<String>> {
    let words = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    vec![
        words("link set lo up"),
        words(&format!("link add {IFACE} type dummy")),
        words(&format!("addr add {ADDR} dev {IFACE}")),
        words(&format!("link set {IFACE} up")),
        words(&format!("route add default dev {IFACE}")),
    ]
}

fn run(program: &str, args: &[String], stdin: Option<&str>) -> Result<(), NetUpError> {
    let spawn_err = |source| NetUpError::Spawn {
        program: program.to_owned(),
        source,
    };
    // PID 1 has no environment: the programs are found on the agent's PATH.
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", crate::boot::PATH)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetUpError::Failed {
        command: format!("{program} {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr)
            .trim()
            .chars()
            .take(300)
            .collect(),
    })
}

/// Brings the network up (after the root switch: `ip` and `nft` are the
/// root's). The rules load first, so no packet leaves before them.
pub fn bring_up() -> Result<(), NetUpError> {
    run("nft", &["-f".to_owned(), "-".to_owned()], Some(&rules()))?;
    match std::fs::write(NO_IPV6_ON_NEW_LINKS, "1") {
        Ok(()) => {}
        // A kernel without IPv6: nothing to turn off.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(NetUpError::Ipv6(e)),
    }
    for args in ip_commands() {
        run("ip", &args, None)?;
    }
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write("/etc/resolv.conf", RESOLV_CONF).map_err(NetUpError::Resolv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_redirect_to_the_agent_and_drop_the_rest() {
        let rules = rules();
        assert!(rules.contains("tcp redirect to :849"), "{rules}");
        assert!(rules.contains("udp dport 53 redirect to :53"));
        assert_eq!(rules.matches("policy drop").count(), 2);
        assert_eq!(rules.matches("log group 849 snaplen 48").count(), 2);
        assert!(!rules.contains("{{"), "{rules}");
        let cmds = ip_commands();
        assert_eq!(cmds[0], ["link", "set", "lo", "up"]);
        assert_eq!(
            cmds.last().unwrap(),
            &["route", "add", "default", "dev", IFACE]
        );
    }
}
