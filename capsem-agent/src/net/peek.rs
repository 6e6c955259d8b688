//! What an intercepted connection's first bytes say it is for: the TLS
//! ClientHello's SNI or the HTTP/1 request's Host (without a port). Pure
//! and bounded; the caller stops reading at [`MAX_PEEK`] bytes or a short
//! deadline (a server-first protocol sends nothing).

/// The most bytes read before giving up on finding a name.
pub const MAX_PEEK: usize = 16 * 1024;

/// The verdict on the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Could still become a ClientHello or a request head.
    NeedMore,
    /// Done: the SNI or Host, or none (another protocol, no name sent).
    Done(Option<String>),
}

/// Inspects the first bytes of a connection.
pub fn inspect(buf: &[u8]) -> Peek {
    match buf.first() {
        None => Peek::NeedMore,
        Some(0x16) => tls_sni(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => Peek::Done(None),
    }
}

fn http_host(buf: &[u8]) -> Peek {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Peek::NeedMore,
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| strip_port(v.trim()).to_owned());
            Peek::Done(host)
        }
        Err(_) => Peek::Done(None),
    }
}

/// `name:80` -> `name`; `[::1]:80` -> `::1`.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A cursor over a ClientHello; `None` for bytes that run out.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn tls_sni(buf: &[u8]) -> Peek {
    // Record header: type, version, length; the hello is in the first record.
    let Some(header) = buf.get(..5) else {
        return Peek::NeedMore;
    };
    let len = u16::from_be_bytes([header[3], header[4]]) as usize;
    let Some(record) = buf.get(5..5 + len) else {
        return if 5 + len > MAX_PEEK {
            Peek::Done(None)
        } else {
            Peek::NeedMore
        };
    };
    Peek::Done(client_hello_sni(record))
}

fn client_hello_sni(record: &[u8]) -> Option<String> {
    let mut c = Cur(record);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    c.take(3)?; // handshake length (the record bounds us)
    c.take(2 + 32)?; // version, random
    c.vec8()?; // session id
    c.vec16()?; // cipher suites
    c.vec8()?; // compression methods
    let mut exts = Cur(c.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let body = exts.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Cur(Cur(body).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_owned);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record naming `sni`.
    pub(crate) fn client_hello(sni: &str) -> Vec<u8> {
        let name = sni.as_bytes();
        let mut sn = Vec::new();
        sn.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sn.push(0);
        sn.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sn.extend_from_slice(name);
        let mut exts = Vec::new();
        exts.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&(sn.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sn);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tls_sni_whole_and_in_pieces() {
        let hello = client_hello("pypi.org");
        assert_eq!(inspect(&hello), Peek::Done(Some("pypi.org".into())));
        for cut in [1, 4, 5, 20, hello.len() - 1] {
            assert_eq!(inspect(&hello[..cut]), Peek::NeedMore, "cut at {cut}");
        }
        // Garbage inside a complete record: no name, no panic.
        let mut bad = hello.clone();
        bad[5] = 2;
        assert_eq!(inspect(&bad), Peek::Done(None));
        let mut short = hello.clone();
        short.truncate(60);
        short[3..5].copy_from_slice(&55u16.to_be_bytes());
        assert_eq!(inspect(&short), Peek::Done(None));
    }

    #[test]
    fn a_record_longer_than_the_bound_gives_up() {
        let mut rec = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        rec.extend_from_slice(&[0; 100]);
        assert_eq!(inspect(&rec), Peek::Done(None));
    }

    #[test]
    fn http_host() {
        let req = b"GET / HTTP/1.1\r\nHost: Test.Capsem:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(inspect(req), Peek::Done(Some("Test.Capsem".into())));
        assert_eq!(inspect(&req[..20]), Peek::NeedMore);
        let v6 = b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n";
        assert_eq!(inspect(v6), Peek::Done(Some("::1".into())));
        let none = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(inspect(none), Peek::Done(None));
        assert_eq!(inspect(b"SSH-2.0-x\r\n"), Peek::Done(None));
        assert_eq!(inspect(b"\x00\x01"), Peek::Done(None));
        assert_eq!(inspect(b""), Peek::NeedMore);
    }
}
