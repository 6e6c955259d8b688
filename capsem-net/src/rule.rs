//! One `--net allow=` rule: what it names and, optionally, the one port it
//! allows.
//!
//! Spellings (a port is `:PORT` after the target; IPv6 takes brackets when
//! it has a port):
//!
//! | rule                          | target                            |
//! |-------------------------------|-----------------------------------|
//! | `pypi.org`, `pypi.org:443`    | exactly that name                 |
//! | `*.githubusercontent.com`     | every name below it, not the apex |
//! | `127.0.0.1:8080`, `[::1]:80`  | that address                      |
//! | `10.0.0.0/8`, `[fd00::/8]:22` | every address in the prefix       |
//!
//! Names are compared lowercased without a trailing dot; a name whose last
//! label is all digits is refused (it would read as a mistyped address).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Why a rule did not parse; shown to the user as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("empty rule")]
    Empty,
    #[error("bad port {0:?} (1-65535)")]
    Port(String),
    #[error("bad host name {0:?}")]
    Name(String),
    #[error("bad address {0:?}")]
    Address(String),
    #[error("a wildcard is `*.` followed by a domain, not {0:?}")]
    Wildcard(String),
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly this name (lowercase, no trailing dot).
    Name(String),
    /// Every name ending in `.` + this suffix.
    Below(String),
    /// This address.
    Addr(IpAddr),
    /// Every address in this prefix.
    Net(IpNet),
}

/// A target and the port it is limited to (any port when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    pub port: Option<u16>,
}

impl Target {
    /// Whether `name` (already normalised by [`normalise_name`]) is named.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Name(n) => n == name,
            Target::Below(suffix) => name
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Target::Addr(_) | Target::Net(_) => false,
        }
    }

    /// Whether the rule names `ip` itself (an address or prefix rule).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = crate::ranges::canonical(ip);
        match self {
            Target::Addr(a) => crate::ranges::canonical(*a) == ip,
            Target::Net(n) => n.contains(&ip),
            Target::Name(_) | Target::Below(_) => false,
        }
    }

    fn is_address(&self) -> bool {
        matches!(self, Target::Addr(_) | Target::Net(_))
    }
}

impl Rule {
    /// Whether the rule allows `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// An address or prefix rule (as opposed to a name rule).
    pub fn is_address(&self) -> bool {
        self.target.is_address()
    }
}

/// Lowercases and drops one trailing dot; `None` for what is not a valid
/// host name (letters, digits, `-` and `_` in labels of 1 to 63 bytes, 253
/// bytes in all, no label starting or ending with `-`, a last label that is
/// not all digits).
pub fn normalise_name(raw: &str) -> Option<String> {
    let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    let last_numeric = labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    (labels.iter().all(label_ok) && !last_numeric).then_some(name)
}

fn parse_port(p: &str) -> Result<u16, RuleError> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(RuleError::Port(p.to_owned())),
    }
}

fn parse_address(s: &str) -> Result<Target, RuleError> {
    if let Ok(ip) = IpAddr::from_str(s) {
        return Ok(Target::Addr(ip));
    }
    if let Ok(net) = IpNet::from_str(s) {
        // 10.1.2.3/8 is almost certainly a typo for 10.0.0.0/8.
        if net.addr() != net.network() {
            return Err(RuleError::Address(s.to_owned()));
        }
        return Ok(Target::Net(net));
    }
    Err(RuleError::Address(s.to_owned()))
}

fn looks_like_address(s: &str) -> bool {
    s.contains('/') || s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn parse_target(s: &str) -> Result<Target, RuleError> {
    if let Some(suffix) = s.strip_prefix("*.") {
        let suffix = normalise_name(suffix).ok_or_else(|| RuleError::Wildcard(s.to_owned()))?;
        return Ok(Target::Below(suffix));
    }
    if s.contains('*') {
        return Err(RuleError::Wildcard(s.to_owned()));
    }
    if looks_like_address(s) {
        return parse_address(s);
    }
    normalise_name(s)
        .map(Target::Name)
        .ok_or_else(|| RuleError::Name(s.to_owned()))
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(raw: &str) -> Result<Self, RuleError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        // [v6] or [v6/len], then an optional :port.
        if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| RuleError::Address(s.to_owned()))?;
            let target = parse_address(inner)?;
            let port = match after {
                "" => None,
                p => Some(parse_port(
                    p.strip_prefix(':')
                        .ok_or_else(|| RuleError::Address(s.to_owned()))?,
                )?),
            };
            return Ok(Rule { target, port });
        }
        // A bare IPv6 address or prefix has several colons and no port.
        if s.matches(':').count() > 1 {
            return Ok(Rule {
                target: parse_address(s)?,
                port: None,
            });
        }
        let (target, port) = match s.rsplit_once(':') {
            Some((t, p)) => (t, Some(parse_port(p)?)),
            None => (s, None),
        };
        Ok(Rule {
            target: parse_target(target)?,
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Below(s) => write!(f, "*.{s}"),
            Target::Addr(a) => write!(f, "{a}"),
            Target::Net(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = matches!(self.target, Target::Addr(IpAddr::V6(_)))
            || matches!(self.target, Target::Net(IpNet::V6(_)));
        match (self.port, v6) {
            (None, _) => write!(f, "{}", self.target),
            (Some(p), true) => write!(f, "[{}]:{p}", self.target),
            (Some(p), false) => write!(f, "{}:{p}", self.target),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap()
    }

    #[test]
    fn spellings_parse_and_print_back() {
        for s in [
            "pypi.org",
            "pypi.org:443",
            "*.githubusercontent.com",
            "*.githubusercontent.com:443",
            "127.0.0.1:8080",
            "10.0.0.0/8",
            "10.0.0.0/8:22",
            "::1",
            "[::1]:8080",
            "fd00::/8",
            "[fd00::/8]:443",
            "localhost",
            "_dmarc.example.com",
        ] {
            assert_eq!(rule(s).to_string(), s, "{s}");
        }
        assert_eq!(rule("PyPI.org.").to_string(), "pypi.org");
        assert_eq!(rule(" pypi.org ").to_string(), "pypi.org");
    }

    #[test]
    fn targets_are_what_they_look_like() {
        assert_eq!(rule("a.b").target, Target::Name("a.b".into()));
        assert_eq!(rule("*.a.b").target, Target::Below("a.b".into()));
        assert!(matches!(rule("1.2.3.4").target, Target::Addr(_)));
        assert!(matches!(rule("1.2.0.0/16").target, Target::Net(_)));
        assert_eq!(rule("a.b:80").port, Some(80));
        assert_eq!(rule("a.b").port, None);
    }

    #[test]
    fn malformed_rules_are_refused_with_the_reason() {
        let err = |s: &str| s.parse::<Rule>().unwrap_err();
        assert_eq!(err(""), RuleError::Empty);
        assert_eq!(err("a.b:0"), RuleError::Port("0".into()));
        assert_eq!(err("a.b:65536"), RuleError::Port("65536".into()));
        assert_eq!(err("a.b:+80"), RuleError::Port("+80".into()));
        assert_eq!(err("a.b:"), RuleError::Port("".into()));
        assert_eq!(err("a..b"), RuleError::Name("a..b".into()));
        assert_eq!(err("-a.b"), RuleError::Name("-a.b".into()));
        assert_eq!(err("a b"), RuleError::Name("a b".into()));
        assert_eq!(err("1.2.3"), RuleError::Address("1.2.3".into()));
        assert_eq!(err("300.1.1.1"), RuleError::Address("300.1.1.1".into()));
        assert_eq!(err("10.1.2.3/8"), RuleError::Address("10.1.2.3/8".into()));
        assert_eq!(err("a.*.b"), RuleError::Wildcard("a.*.b".into()));
        assert_eq!(err("*"), RuleError::Wildcard("*".into()));
        assert_eq!(err("*."), RuleError::Wildcard("*.".into()));
        assert_eq!(err("[::1"), RuleError::Address("[::1".into()));
        assert_eq!(err("[::1]80"), RuleError::Address("[::1]80".into()));
        assert!(err(&"a".repeat(64)).to_string().contains("bad host name"));
    }

    #[test]
    fn a_wildcard_matches_below_its_domain_only() {
        let t = rule("*.example.com").target;
        assert!(t.matches_name("a.example.com"));
        assert!(t.matches_name("a.b.example.com"));
        assert!(!t.matches_name("example.com"));
        assert!(!t.matches_name("badexample.com"));
        assert!(!t.matches_name(".example.com"));
        assert!(!t.matches_name("example.com.evil"));
    }

    #[test]
    fn an_exact_name_matches_itself_only() {
        let t = rule("pypi.org").target;
        assert!(t.matches_name("pypi.org"));
        assert!(!t.matches_name("files.pypi.org"));
        assert!(!t.matches_name("pypi.org.evil"));
        assert!(!t.contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn address_rules_contain_their_addresses_mapped_v6_included() {
        let t = rule("127.0.0.1").target;
        assert!(t.contains("127.0.0.1".parse().unwrap()));
        assert!(t.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!t.contains("127.0.0.2".parse().unwrap()));
        let n = rule("10.0.0.0/8").target;
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(!n.matches_name("10.0.0.1"));
    }

    #[test]
    fn ports_limit_when_given() {
        assert!(rule("a.b:443").allows_port(443));
        assert!(!rule("a.b:443").allows_port(80));
        assert!(rule("a.b").allows_port(80));
    }

    #[test]
    fn names_normalise_or_are_refused() {
        assert_eq!(normalise_name("A.B."), Some("a.b".into()));
        assert_eq!(normalise_name("a.b.."), None);
        assert_eq!(normalise_name(""), None);
        assert_eq!(normalise_name("."), None);
        assert_eq!(normalise_name("a.123"), None);
        assert_eq!(normalise_name("123.a"), Some("123.a".into()));
        assert_eq!(
            normalise_name(&format!("{}.b", "a".repeat(63))).map(|n| n.len()),
            Some(65)
        );
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(long.len() > 253);
        assert_eq!(normalise_name(&long), None);
    }
}
