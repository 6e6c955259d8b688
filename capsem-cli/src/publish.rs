//! `-p [HOST_IP:]HOST_PORT:GUEST_PORT` (repeatable) of a new VM: parsed and
//! checked before anything boots (a bad spec, a port 0, a host port given
//! twice, more than [`MAX_PUBLISH`], `--vmm none`, or a host address that
//! cannot be listened on is one line and exit 125) into the [`Publish`]es
//! that `vm.json` records and capsem-process receives as `--publish`.
//!
//! The listen check here ([`check_free`]) only makes the common mistake
//! fail before a VM is made; capsem-process binds for real before the VM
//! is reported ready, and a port taken in between is its startup error.

use std::net::TcpListener;

use capsem_host::publish::{Publish, PublishError, MAX_PUBLISH};

use crate::cli::Vmm;

/// Why a `-p` was refused (exit 125).
#[derive(Debug, thiserror::Error)]
pub enum PublishArgError {
    #[error("-p {spec:?}")]
    Spec {
        spec: String,
        #[source]
        source: PublishError,
    },
    #[error("-p {spec:?}: host port {port} is already published by -p {other:?}")]
    Duplicate {
        spec: String,
        port: u16,
        other: String,
    },
    #[error("at most {MAX_PUBLISH} -p ports per VM")]
    TooMany,
    #[error("-p needs a VM: --vmm none runs the guest on this host, where its ports already are")]
    NeedsVm,
    #[error("-p {spec:?}: cannot listen on {addr}")]
    Listen {
        spec: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Parses every `-p` of a new VM; none is `Ok(vec![])` for any backend.
pub fn parse_all(specs: &[String], vmm: Vmm) -> Result<Vec<Publish>, PublishArgError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    if vmm == Vmm::None {
        return Err(PublishArgError::NeedsVm);
    }
    if specs.len() > MAX_PUBLISH {
        return Err(PublishArgError::TooMany);
    }
    let mut out: Vec<(Publish, &String)> = Vec::new();
    for spec in specs {
        let p = Publish::parse(spec).map_err(|source| PublishArgError::Spec {
            spec: spec.clone(),
            source,
        })?;
        // One host port once, whatever the address: 0.0.0.0 and
        // 127.0.0.1 on one port cannot both be listened on.
        if let Some((_, other)) = out.iter().find(|(o, _)| o.host_port == p.host_port) {
            return Err(PublishArgError::Duplicate {
                spec: spec.clone(),
                port: p.host_port,
                other: (*other).clone(),
            });
        }
        out.push((p, spec));
    }
    Ok(out.into_iter().map(|(p, _)| p).collect())
}

/// Listens on each host address and closes it again: a port in use (or an
/// address this host does not have) is refused before a VM is made.
pub fn check_free(publish: &[Publish]) -> Result<(), PublishArgError> {
    for p in publish {
        let addr = p.host_addr();
        TcpListener::bind(addr).map_err(|source| PublishArgError::Listen {
            spec: p.to_arg(),
            addr,
            source,
        })?;
    }
    Ok(())
}

/// [`parse_all`], then [`check_free`].
pub fn resolve(specs: &[String], vmm: Vmm) -> Result<Vec<Publish>, PublishArgError> {
    let publish = parse_all(specs, vmm)?;
    check_free(&publish)?;
    Ok(publish)
}

/// capsem-process's `--publish IP:HOST_PORT:GUEST_PORT` for each of
/// `vm.json`'s ports, on every boot and adoption: the new capsem-process
/// listens again.
pub fn process_args(publish: &[Publish]) -> impl Iterator<Item = std::ffi::OsString> + '_ {
    publish
        .iter()
        .flat_map(|p| ["--publish".into(), std::ffi::OsString::from(p.to_arg())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_in_order_with_the_default_address() {
        let got = parse_all(&specs(&["8080:80", "[::1]:9090:90"]), Vmm::Qemu).unwrap();
        let args: Vec<String> = got.iter().map(Publish::to_arg).collect();
        assert_eq!(args, ["127.0.0.1:8080:80", "[::1]:9090:90"]);
        let flags: Vec<_> = process_args(&got).collect();
        assert_eq!(
            flags,
            [
                "--publish",
                "127.0.0.1:8080:80",
                "--publish",
                "[::1]:9090:90"
            ]
        );
        assert!(parse_all(&[], Vmm::None).unwrap().is_empty());
    }

    #[test]
    fn refusals() {
        let one = |s: &[&str], vmm| parse_all(&specs(s), vmm).unwrap_err();
        assert!(matches!(
            one(&["80"], Vmm::Qemu),
            PublishArgError::Spec {
                source: PublishError::Form,
                ..
            }
        ));
        assert!(matches!(
            one(&["0:80"], Vmm::Qemu),
            PublishArgError::Spec {
                source: PublishError::Zero,
                ..
            }
        ));
        assert!(matches!(
            one(&["8080:80", "0.0.0.0:8080:81"], Vmm::Qemu),
            PublishArgError::Duplicate { port: 8080, .. }
        ));
        assert!(matches!(
            one(&["8080:80"], Vmm::None),
            PublishArgError::NeedsVm
        ));
        let many: Vec<String> = (0..=MAX_PUBLISH)
            .map(|i| format!("{}:80", 1000 + i))
            .collect();
        assert!(matches!(
            parse_all(&many, Vmm::Qemu),
            Err(PublishArgError::TooMany)
        ));
        // The same guest port twice is fine: two host ports to one server.
        assert_eq!(
            parse_all(&specs(&["8080:80", "8081:80"]), Vmm::Qemu)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_port_in_use_is_refused_and_a_free_one_is_left_free() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let taken = parse_all(&specs(&[&format!("{port}:80")]), Vmm::Qemu).unwrap();
        let err = check_free(&taken).unwrap_err();
        assert!(matches!(err, PublishArgError::Listen { .. }), "{err:?}");
        let line = crate::error::one_line_chain(&err);
        assert!(
            line.contains(&format!("cannot listen on 127.0.0.1:{port}")),
            "{line}"
        );
        drop(held);
        check_free(&taken).unwrap();
        // Closed again: the port can be listened on afterwards.
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
