//! A strict RESP2/RESP3 client over a TcpStream: arbitrary byte arguments, pipelining, and
//! every reply checked byte for byte (CRLF line ends, lengths, nesting), for tests that send
//! what the `redis` crate would refuse to build or would forgive on the way back.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One reply, as the wire had it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    Null,
    Array(Vec<Reply>),
    Map(Vec<(Reply, Reply)>),
    Set(Vec<Reply>),
    Bool(bool),
    Double(Vec<u8>),
    BigNumber(Vec<u8>),
    Verbatim(Vec<u8>),
}

impl Reply {
    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    pub fn text(&self) -> String {
        match self {
            Reply::Simple(b) | Reply::Error(b) | Reply::Bulk(b) | Reply::Verbatim(b) => {
                String::from_utf8_lossy(b).into_owned()
            }
            Reply::Int(i) => i.to_string(),
            other => format!("{other:?}"),
        }
    }

    /// A map reply (RESP3 map or RESP2 flat array) as field -> value.
    pub fn as_map(&self) -> Option<BTreeMap<String, Reply>> {
        match self {
            Reply::Map(pairs) => Some(pairs.iter().map(|(k, v)| (k.text(), v.clone())).collect()),
            Reply::Array(items) if items.len() % 2 == 0 => Some(
                items
                    .chunks(2)
                    .map(|kv| (kv[0].text(), kv[1].clone()))
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// A raw connection that checks every reply byte for byte.
pub struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// Appends one command, RESP-encoded (an array of bulk strings), to `out`.
pub fn encode(args: &[Vec<u8>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl Raw {
    /// Connects to 127.0.0.1:`port` (20 s timeouts), after `HELLO 3` when `resp3`.
    pub fn connect(port: u16, resp3: bool) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .expect("write timeout");
        let writer = stream.try_clone().expect("clone");
        let mut raw = Raw {
            reader: BufReader::new(stream),
            writer,
        };
        if resp3 {
            let hello = raw.call(&[b"HELLO".to_vec(), b"3".to_vec()]);
            assert!(
                matches!(hello, Reply::Map(_)),
                "HELLO 3 did not answer a map: {hello:?}"
            );
        }
        raw
    }

    /// Sends commands in one write, then reads one reply each.
    pub fn pipeline(&mut self, cmds: &[Vec<Vec<u8>>]) -> Vec<Result<Reply, String>> {
        let mut buf = Vec::new();
        for c in cmds {
            encode(c, &mut buf);
        }
        if let Err(e) = self.writer.write_all(&buf) {
            return cmds.iter().map(|_| Err(format!("write: {e}"))).collect();
        }
        let mut out = Vec::with_capacity(cmds.len());
        for _ in cmds {
            let r = self.read_reply(0);
            let failed = r.is_err();
            out.push(r);
            if failed {
                break;
            }
        }
        while out.len() < cmds.len() {
            out.push(Err("no reply (stream broken earlier)".into()));
        }
        out
    }

    /// One command, its reply (panics on a broken stream).
    pub fn call(&mut self, args: &[Vec<u8>]) -> Reply {
        let mut r = self.pipeline(&[args.to_vec()]);
        r.remove(0)
            .unwrap_or_else(|e| panic!("{:?}: {e}", show_args(args)))
    }

    /// A line up to CRLF; a bare CR or LF inside is a protocol error.
    fn line(&mut self) -> Result<Vec<u8>, String> {
        let mut line = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        if !line.ends_with(b"\r\n") {
            return Err(format!("line not ended by CRLF: {line:?}"));
        }
        line.truncate(line.len() - 2);
        if line.contains(&b'\r') || line.contains(&b'\n') {
            return Err(format!("bare CR/LF in a line: {line:?}"));
        }
        Ok(line)
    }

    fn number(&mut self, head: &[u8]) -> Result<i64, String> {
        std::str::from_utf8(head)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| format!("bad length/integer {head:?}"))
    }

    fn blob(&mut self, len: i64) -> Result<Vec<u8>, String> {
        let len = usize::try_from(len).map_err(|_| format!("bad blob length {len}"))?;
        let mut data = vec![0u8; len + 2];
        self.reader
            .read_exact(&mut data)
            .map_err(|e| format!("read blob: {e}"))?;
        if !data.ends_with(b"\r\n") {
            return Err("blob not ended by CRLF".into());
        }
        data.truncate(len);
        Ok(data)
    }

    fn read_reply(&mut self, depth: usize) -> Result<Reply, String> {
        if depth > 16 {
            return Err("reply nested too deep".into());
        }
        let line = self.line()?;
        let (&kind, rest) = line.split_first().ok_or("empty line")?;
        let rest = rest.to_vec();
        Ok(match kind {
            b'+' => Reply::Simple(rest),
            b'-' => Reply::Error(rest),
            b':' => Reply::Int(self.number(&rest)?),
            b'$' => match self.number(&rest)? {
                -1 => Reply::Null,
                n => Reply::Bulk(self.blob(n)?),
            },
            b'!' => {
                let n = self.number(&rest)?;
                Reply::Error(self.blob(n)?)
            }
            b'=' => {
                let n = self.number(&rest)?;
                Reply::Verbatim(self.blob(n)?)
            }
            b'*' | b'~' | b'>' => match self.number(&rest)? {
                -1 => Reply::Null,
                n => {
                    let mut items = Vec::new();
                    for _ in 0..n {
                        items.push(self.read_reply(depth + 1)?);
                    }
                    if kind == b'~' {
                        Reply::Set(items)
                    } else {
                        Reply::Array(items)
                    }
                }
            },
            b'%' => {
                let n = self.number(&rest)?;
                let mut pairs = Vec::new();
                for _ in 0..n {
                    let k = self.read_reply(depth + 1)?;
                    let v = self.read_reply(depth + 1)?;
                    pairs.push((k, v));
                }
                Reply::Map(pairs)
            }
            b'_' if rest.is_empty() => Reply::Null,
            b'#' if rest == b"t" || rest == b"f" => Reply::Bool(rest == b"t"),
            b',' => Reply::Double(rest),
            b'(' => Reply::BigNumber(rest),
            other => return Err(format!("unknown reply type {:?}", other as char)),
        })
    }
}

/// Arguments shown briefly (long ones cut) for failure messages.
pub fn show_args(args: &[Vec<u8>]) -> String {
    let parts: Vec<String> = args
        .iter()
        .map(|a| {
            let s = String::from_utf8_lossy(&a[..a.len().min(40)]).into_owned();
            if a.len() > 40 {
                format!("{s:?}...({} bytes)", a.len())
            } else {
                format!("{s:?}")
            }
        })
        .collect();
    parts.join(" ")
}

/// String arguments as byte arguments.
pub fn bytes(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}
