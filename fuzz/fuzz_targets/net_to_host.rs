//! The network port: the questions the host decodes from the guest
//! (`Codec<NetHost>`), then what capsem-process does with each: the bounds
//! check, and the policy's two steps on the guest's name, SNI/Host, address
//! and port (capsem-net), which must never panic on any of them.
#![no_main]

use capsem_net::Policy;
use capsem_proto::frame::{NetGuest, NetHost};
use capsem_proto::net::NetToHost;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = Policy::from_args(&["allow=pypi.org:443,*.example.com,127.0.0.1:8080"])
        .expect("a valid policy");
    let open = Policy::from_args(&["open"]).expect("a valid policy");
    capsem_fuzz::drive::<NetHost, NetGuest>(data, |msg| {
        let _ = msg.token();
        if !msg.within_bounds() {
            return;
        }
        match msg {
            NetToHost::Resolve { name, .. } => {
                let _ = policy.may_resolve(name);
                let _ = open.may_resolve(name);
            }
            NetToHost::Connect {
                name,
                seen,
                ip,
                port,
                ..
            } => {
                for p in [&policy, &open] {
                    if let Ok(grant) = p.check_connection(name.as_deref(), seen.as_deref(), *port) {
                        if let Ok(addr) = ip.parse() {
                            let _ = p.check_address(&grant, addr).to_string();
                        }
                    }
                }
            }
            // The host parses the address and writes a record
            // (capsem-process net/dropped.rs); the bounds above are the
            // protocol's part.
            NetToHost::Dropped { ip, .. } => {
                let _ = ip.parse::<std::net::IpAddr>();
            }
        }
    });
});
