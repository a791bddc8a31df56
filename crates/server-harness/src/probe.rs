//! Raw protocol probes over std TCP: enough of RESP, HTTP/1.1 and the PostgreSQL startup
//! exchange to know that a server really answers, without pulling in any client crate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connect/read/write timeout of a single probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends a Redis command in RESP and returns the first reply line (e.g. `+PONG`, `-NOAUTH ...`).
pub fn redis_command(
    addr: SocketAddr,
    args: &[&str],
    timeout: Duration,
) -> std::io::Result<String> {
    let mut s = connect(addr, timeout)?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
    }
    s.write_all(req.as_bytes())?;
    read_line(&mut s)
}

fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = s.read(&mut byte)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        out.push(byte[0]);
        if out.len() > 64 * 1024 {
            break;
        }
    }
    if out.last() == Some(&b'\r') {
        out.pop();
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// True if a Redis server at `addr` answers a `PING` (with `+PONG`, or with an auth error,
/// which also proves it is up).
pub(crate) fn redis_ping(addr: SocketAddr) -> bool {
    match redis_command(addr, &["PING"], PROBE_TIMEOUT) {
        Ok(line) => {
            line == "+PONG" || line.starts_with("-NOAUTH") || line.starts_with("-WRONGPASS")
        }
        Err(_) => false,
    }
}

/// A minimal HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The body (chunked transfer encoding is decoded).
    pub body: String,
}

/// Sends one plain-HTTP request (`Connection: close`) and reads the whole response.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let mut s = connect(addr, timeout)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })
}

fn parse_http(raw: &[u8]) -> Option<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        decode_chunked(body)?
    } else {
        body.to_string()
    };
    Some(HttpResponse { status, body })
}

fn decode_chunked(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size_line, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// Plain-HTTP GET with the probe timeout.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Option<HttpResponse> {
    http_request(addr, "GET", path, &[], None, PROBE_TIMEOUT).ok()
}

/// Sends a PostgreSQL v3 StartupMessage for `user`/`database` and classifies the first reply.
///
/// Returns true when the server asks for authentication or accepts (`R` message): the
/// postmaster is past recovery and takes connections. An `E` ("the database system is
/// starting up") or no answer means not ready.
pub(crate) fn postgres_ready(addr: SocketAddr, user: &str, database: &str) -> bool {
    let Ok(mut s) = connect(addr, PROBE_TIMEOUT) else {
        return false;
    };
    let mut payload = Vec::new();
    payload.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    for (k, v) in [("user", user), ("database", database)] {
        payload.extend_from_slice(k.as_bytes());
        payload.push(0);
        payload.extend_from_slice(v.as_bytes());
        payload.push(0);
    }
    payload.push(0);
    let len = (payload.len() + 4) as u32;
    let mut msg = len.to_be_bytes().to_vec();
    msg.extend_from_slice(&payload);
    if s.write_all(&msg).is_err() {
        return false;
    }
    let mut tag = [0u8; 1];
    match s.read_exact(&mut tag) {
        Ok(()) => tag[0] == b'R',
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_http() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        let r = parse_http(raw).expect("parse");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "Wikipedia");
    }

    #[test]
    fn parses_plain_http() {
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno";
        let r = parse_http(raw).expect("parse");
        assert_eq!(r.status, 404);
        assert_eq!(r.body, "no");
    }
}
