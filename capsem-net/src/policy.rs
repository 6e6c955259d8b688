//! `--net none | open | allow=RULE[,RULE...]` and the decisions made with it.
//!
//! A connection is decided in two steps, because the name is known before
//! the address is:
//!
//! 1. [`Policy::check_connection`]: the name the guest's DNS answer stood
//!    for (or none, for an address literal), the TLS SNI or HTTP Host the
//!    agent saw, and the port. The SNI/Host must be that name (no domain
//!    fronting through an allowed address), and a rule (or `open`) must
//!    allow the name on the port.
//! 2. [`Policy::check_address`]: each address the host resolved the name
//!    to. A reserved one (loopback, private, metadata: [`crate::ranges`]) is
//!    dialled only when an address rule names it, even under `open`.

use std::fmt;
use std::net::IpAddr;

use crate::ranges::{self, Reserved};
use crate::rule::{normalise_name, Rule, RuleError};

/// Why the `--net` values were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("--net {value:?}: {source}")]
    Rule {
        value: String,
        #[source]
        source: RuleError,
    },
    #[error("--net {0:?}: expected none, open or allow=RULE[,RULE...]")]
    Unknown(String),
    #[error("--net none cannot be combined with other --net values")]
    NoneAndMore,
}

/// The policy of one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `--net open`: any public address on any port.
    pub open: bool,
    /// The `allow=` rules, in the order given.
    pub rules: Vec<Rule>,
}

/// What decided an allowed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Because {
    Open,
    Rule(Rule),
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// `--net none`.
    NoNetwork,
    /// No rule names this name (or address) on this port.
    NoRule,
    /// The SNI or Host the guest sent is not the name it resolved.
    Fronting { name: String, seen: String },
    /// The address is reserved and no address rule names it.
    Reserved { ip: IpAddr, kind: Reserved },
}

/// The decision, with what decided it (for the connection's record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow(Because),
    Deny(Denied),
}

/// A connection that passed step 1: the rule that allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub because: Because,
    pub port: u16,
}

impl Policy {
    /// The policy from every `--net` value, in order (none given: `none`).
    pub fn from_args<S: AsRef<str>>(values: &[S]) -> Result<Self, PolicyError> {
        let mut policy = Policy::default();
        let mut none = false;
        for v in values {
            let v = v.as_ref().trim();
            match v {
                "none" => none = true,
                "open" => policy.open = true,
                _ => {
                    let list = v
                        .strip_prefix("allow=")
                        .ok_or_else(|| PolicyError::Unknown(v.to_owned()))?;
                    for raw in list.split(',') {
                        let rule = raw.parse().map_err(|source| PolicyError::Rule {
                            value: v.to_owned(),
                            source,
                        })?;
                        policy.rules.push(rule);
                    }
                }
            }
        }
        if none && (policy.open || !policy.rules.is_empty()) {
            return Err(PolicyError::NoneAndMore);
        }
        Ok(policy)
    }

    /// `--net none`: nothing may leave the guest.
    pub fn is_none(&self) -> bool {
        !self.open && self.rules.is_empty()
    }

    /// Whether the guest's resolver may answer for `name` at all (some rule
    /// names it on some port, or `open`); everything else is NXDOMAIN.
    pub fn may_resolve(&self, name: &str) -> bool {
        let Some(name) = normalise_name(name) else {
            return false;
        };
        self.open || self.rules.iter().any(|r| r.target.matches_name(&name))
    }

    /// Step 1. `name`: what the guest's DNS answer stood for, `None` for an
    /// address literal. `seen`: the TLS SNI or HTTP Host, if any.
    pub fn check_connection(
        &self,
        name: Option<&str>,
        seen: Option<&str>,
        port: u16,
    ) -> Result<Grant, Denied> {
        if self.is_none() {
            return Err(Denied::NoNetwork);
        }
        let grant = |because| Ok(Grant { because, port });
        let Some(raw) = name else {
            // An address literal: step 2 decides with address rules (or open).
            return grant(Because::Open);
        };
        let name = normalise_name(raw).ok_or(Denied::NoRule)?;
        if let Some(seen) = seen {
            if normalise_name(seen).as_deref() != Some(name.as_str()) {
                return Err(Denied::Fronting {
                    name,
                    seen: seen.to_owned(),
                });
            }
        }
        if let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.target.matches_name(&name) && r.allows_port(port))
        {
            return grant(Because::Rule(rule.clone()));
        }
        if self.open {
            return grant(Because::Open);
        }
        Err(Denied::NoRule)
    }

    /// Step 2: whether `ip` (resolved for the granted name, or the literal
    /// the guest dialled) may be dialled.
    pub fn check_address(&self, grant: &Grant, ip: IpAddr) -> Verdict {
        let by_address = self
            .rules
            .iter()
            .find(|r| r.target.contains(ip) && r.allows_port(grant.port));
        if let Some(rule) = by_address {
            return Verdict::Allow(Because::Rule(rule.clone()));
        }
        if let Some(kind) = ranges::reserved(ip) {
            return Verdict::Deny(Denied::Reserved { ip, kind });
        }
        match &grant.because {
            Because::Rule(r) if !r.is_address() => Verdict::Allow(grant.because.clone()),
            Because::Open if self.open => Verdict::Allow(Because::Open),
            _ => Verdict::Deny(Denied::NoRule),
        }
    }

    /// The `--net` values that give this policy back through
    /// [`Policy::from_args`] (empty for `none`): how the CLI records it in
    /// `vm.json` and passes it to capsem-process.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.open {
            args.push("open".to_owned());
        }
        if !self.rules.is_empty() {
            let rules: Vec<String> = self.rules.iter().map(Rule::to_string).collect();
            args.push(format!("allow={}", rules.join(",")));
        }
        args
    }

    /// The rules as `--net` would spell them (for `inspect`).
    pub fn describe(&self) -> String {
        match (self.open, self.rules.is_empty()) {
            (false, true) => "none".into(),
            (true, true) => "open".into(),
            (open, false) => {
                let rules: Vec<String> = self.rules.iter().map(Rule::to_string).collect();
                let allow = format!("allow={}", rules.join(","));
                if open {
                    format!("open {allow}")
                } else {
                    allow
                }
            }
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow(Because::Open) => f.write_str("allow open"),
            Verdict::Allow(Because::Rule(r)) => write!(f, "allow {r}"),
            Verdict::Deny(d) => write!(f, "deny: {d}"),
        }
    }
}

impl fmt::Display for Because {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Because::Open => f.write_str("open"),
            Because::Rule(r) => write!(f, "allow={r}"),
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::NoNetwork => f.write_str("--net none"),
            Denied::NoRule => f.write_str("no rule allows it"),
            Denied::Fronting { name, seen } => {
                write!(f, "resolved {name:?} but asked for {seen:?}")
            }
            Denied::Reserved { ip, kind } => {
                write!(f, "{ip} is {} and no rule names it", kind.as_str())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn policy(args: &[&str]) -> Policy {
        Policy::from_args(args).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Both steps, as capsem-process runs them.
    fn decide(
        p: &Policy,
        name: Option<&str>,
        seen: Option<&str>,
        addr: &str,
        port: u16,
    ) -> Verdict {
        match p.check_connection(name, seen, port) {
            Ok(g) => p.check_address(&g, ip(addr)),
            Err(d) => Verdict::Deny(d),
        }
    }

    fn allowed(v: &Verdict) -> bool {
        matches!(v, Verdict::Allow(_))
    }

    #[test]
    fn args_parse_into_a_policy() {
        assert!(policy(&[]).is_none());
        assert!(policy(&["none"]).is_none());
        assert!(policy(&["open"]).open);
        let p = policy(&[
            "allow=pypi.org,*.pythonhosted.org:443",
            "allow=127.0.0.1:8080",
        ]);
        assert_eq!(p.rules.len(), 3);
        assert_eq!(
            p.describe(),
            "allow=pypi.org,*.pythonhosted.org:443,127.0.0.1:8080"
        );
        assert_eq!(policy(&["open"]).describe(), "open");
        assert_eq!(policy(&[]).describe(), "none");
    }

    #[test]
    fn bad_args_are_refused_with_the_value() {
        let e = Policy::from_args(&["allow=pypi.org,bad name"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--net \"allow=pypi.org,bad name\": bad host name \"bad name\""
        );
        assert!(matches!(
            Policy::from_args(&["closed"]),
            Err(PolicyError::Unknown(_))
        ));
        assert!(matches!(
            Policy::from_args(&["allow="]),
            Err(PolicyError::Rule { .. })
        ));
        assert_eq!(
            Policy::from_args(&["none", "open"]),
            Err(PolicyError::NoneAndMore)
        );
    }

    #[test]
    fn none_refuses_everything() {
        let p = policy(&["none"]);
        assert!(!p.may_resolve("pypi.org"));
        assert_eq!(
            decide(&p, Some("pypi.org"), None, "151.101.0.223", 443),
            Verdict::Deny(Denied::NoNetwork)
        );
        assert_eq!(
            decide(&p, None, None, "151.101.0.223", 443),
            Verdict::Deny(Denied::NoNetwork)
        );
    }

    #[test]
    fn an_allowed_name_reaches_its_public_addresses_on_its_port() {
        let p = policy(&["allow=pypi.org:443"]);
        assert!(p.may_resolve("PyPI.org."));
        assert!(!p.may_resolve("evil.org"));
        let v = decide(&p, Some("pypi.org"), Some("pypi.org"), "151.101.0.223", 443);
        assert_eq!(
            v,
            Verdict::Allow(Because::Rule("pypi.org:443".parse().unwrap()))
        );
        assert_eq!(v.to_string(), "allow pypi.org:443");
        assert!(!allowed(&decide(
            &p,
            Some("pypi.org"),
            None,
            "151.101.0.223",
            80
        )));
        assert!(!allowed(&decide(
            &p,
            Some("evil.org"),
            None,
            "151.101.0.223",
            443
        )));
    }

    #[test]
    fn fronting_through_an_allowed_name_is_refused() {
        let p = policy(&["allow=pypi.org"]);
        assert_eq!(
            decide(&p, Some("pypi.org"), Some("evil.org"), "151.101.0.223", 443),
            Verdict::Deny(Denied::Fronting {
                name: "pypi.org".into(),
                seen: "evil.org".into()
            })
        );
        assert!(allowed(&decide(
            &p,
            Some("pypi.org"),
            Some("PYPI.ORG"),
            "151.101.0.223",
            443
        )));
    }

    #[test]
    fn reserved_addresses_need_an_address_rule_even_when_open() {
        let open = policy(&["open"]);
        assert!(allowed(&decide(
            &open,
            Some("a.com"),
            None,
            "151.101.0.223",
            443
        )));
        assert!(allowed(&decide(&open, None, None, "151.101.0.223", 443)));
        for addr in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                matches!(
                    decide(&open, Some("a.com"), None, addr, 80),
                    Verdict::Deny(Denied::Reserved { .. })
                ),
                "{addr}"
            );
            assert!(!allowed(&decide(&open, None, None, addr, 80)), "{addr}");
        }
        // A name that resolves to loopback (a hosts file) needs the address too.
        let p = policy(&["allow=test.capsem:8080"]);
        assert!(!allowed(&decide(
            &p,
            Some("test.capsem"),
            None,
            "127.0.0.1",
            8080
        )));
        let p = policy(&["allow=test.capsem:8080,127.0.0.1:8080"]);
        assert!(allowed(&decide(
            &p,
            Some("test.capsem"),
            None,
            "127.0.0.1",
            8080
        )));
        assert!(!allowed(&decide(
            &p,
            Some("test.capsem"),
            None,
            "127.0.0.1",
            8081
        )));
    }

    #[test]
    fn address_literals_need_an_address_rule_or_open() {
        let p = policy(&["allow=pypi.org"]);
        assert_eq!(
            decide(&p, None, None, "151.101.0.223", 443),
            Verdict::Deny(Denied::NoRule)
        );
        let p = policy(&["allow=151.101.0.0/16:443"]);
        assert!(allowed(&decide(&p, None, None, "151.101.0.223", 443)));
        assert!(!allowed(&decide(&p, None, None, "151.101.0.223", 80)));
        assert!(!allowed(&decide(&p, None, None, "151.102.0.1", 443)));
        // An address rule does not make a name allowed.
        assert!(!allowed(&decide(
            &p,
            Some("pypi.org"),
            None,
            "151.101.0.223",
            443
        )));
    }

    #[test]
    fn verdicts_read_as_one_line() {
        let d = Verdict::Deny(Denied::Reserved {
            ip: ip("127.0.0.1"),
            kind: Reserved::Loopback,
        });
        assert_eq!(
            d.to_string(),
            "deny: 127.0.0.1 is loopback and no rule names it"
        );
        assert_eq!(Verdict::Allow(Because::Open).to_string(), "allow open");
    }

    #[test]
    fn to_args_round_trips() {
        for args in [
            &[][..],
            &["open"][..],
            &["allow=pypi.org:443,*.example.com,127.0.0.1:8080,[::1]:80,10.0.0.0/8"][..],
            &["open", "allow=a.b"][..],
        ] {
            let p = policy(args);
            let again = Policy::from_args(&p.to_args()).unwrap();
            assert_eq!(again, p, "{args:?}");
            assert_eq!(p.to_args(), args, "canonical already");
        }
        assert!(policy(&["none"]).to_args().is_empty());
    }
}
