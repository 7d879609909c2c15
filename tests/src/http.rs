//! A deliberately small HTTP/1.1 client written from the spec (common-http.md §4.3/§4.4).
//!
//! It does not use any of the product's client types: requests are assembled byte by byte and
//! written to a `UnixStream`; responses are parsed by hand (status line, headers,
//! `Content-Length` body, chunked bodies, or read-to-EOF).  Connections can be reused
//! (keep-alive) and arbitrary raw bytes can be sent for malformed / slow / huge requests.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Default read/write timeout of a connection: long enough for RSA-4096 generation on a slow
/// CI machine, short enough that a hung service fails the test instead of hanging the suite.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound on the size of a response head; the spec wants ≤ 16 headers, so a few KiB is
/// plenty.
const MAX_HEAD: usize = 64 * 1024;

/// A parsed HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub version: String,
    /// Header names as received (case preserved), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// true if the body was delimited by `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl Response {
    /// First header with that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .count()
    }

    /// Body parsed as JSON (panics with the raw body if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `message` of an error body (panics if absent).
    pub fn message(&self) -> String {
        match self.json().get("message") {
            Some(serde_json::Value::String(s)) => s.clone(),
            other => panic!(
                "error body has no string \"message\": {other:?} (status {}, body {})",
                self.status,
                self.text()
            ),
        }
    }

    /// Whether the server announced it will close the connection.
    pub fn connection_close(&self) -> bool {
        self.header("connection")
            .map(|v| v.eq_ignore_ascii_case("close"))
            .unwrap_or(false)
    }
}

impl std::fmt::Display for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.version, self.status, self.reason)?;
        for (k, v) in &self.headers {
            write!(f, "\n  {k}: {v}")?;
        }
        write!(f, "\n  body: {}", String::from_utf8_lossy(&self.body))
    }
}

/// Build the bytes of a request.
///
/// * `target` is the request-target (path + query) sent verbatim.
/// * With `Some(body)` a `Content-Type: application/json` and `Content-Length` are sent.
/// * Without a body no content headers are sent.
pub fn build_request(method: &str, target: &str, body: Option<&[u8]>) -> Vec<u8> {
    build_request_ct(method, target, body, Some("application/json"))
}

/// Like [`build_request`] but with a chosen (or no) `Content-Type` for the body.
pub fn build_request_ct(
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    content_type: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\nHost: keyd.sock\r\n").as_bytes());
    if let Some(body) = body {
        if let Some(ct) = content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// One client connection; may carry many requests (keep-alive).
pub struct Conn {
    stream: UnixStream,
    /// Bytes read from the socket but not consumed yet (pipelining / over-read).
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(path: &Path) -> io::Result<Conn> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn set_read_timeout(&self, d: Duration) -> io::Result<()> {
        self.stream.set_read_timeout(Some(d))
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Send a JSON (or bodiless) request and read its response.
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        let req = build_request(method, target, body);
        self.stream.write_all(&req)?;
        self.read_response()
    }

    /// Write raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Read more bytes into the buffer; Ok(0) on EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Read until EOF or error and tell whether *any* byte arrived.
    /// Used to check "closed without an HTTP response".
    pub fn read_until_close(&mut self) -> io::Result<Vec<u8>> {
        loop {
            match self.fill() {
                Ok(0) => return Ok(std::mem::take(&mut self.buf)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(std::mem::take(&mut self.buf))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Read exactly one response.  EOF before a complete status line gives
    /// `ErrorKind::UnexpectedEof`.
    pub fn read_response(&mut self) -> io::Result<Response> {
        // 1. head
        let head_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too large",
                ));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a complete response head ({} bytes: {:?})",
                        self.buf.len(),
                        String::from_utf8_lossy(&self.buf)
                    ),
                ));
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end + 4).collect();
        let head = String::from_utf8(head[..head_end].to_vec())
            .map_err(|_| invalid("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().ok_or_else(|| invalid("empty head"))?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_owned();
        if !version.starts_with("HTTP/1.") {
            return Err(invalid(&format!("bad status line {status_line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(&format!("bad status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| invalid(&format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let mut resp = Response {
            status,
            reason,
            version,
            headers,
            body: Vec::new(),
            chunked: false,
        };

        // 2. body
        let te_chunked = resp
            .header("transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        if status == 204 || status == 304 || (100..200).contains(&status) {
            // no body by definition
        } else if te_chunked {
            resp.chunked = true;
            resp.body = self.read_chunked()?;
        } else if let Some(cl) = resp.header("content-length") {
            let len: usize = cl
                .parse()
                .map_err(|_| invalid(&format!("bad content-length {cl:?}")))?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of the body",
                    ));
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else {
            // read to EOF
            loop {
                match self.fill() {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(e),
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = find(&self.buf, b"\r\n") {
                    break p;
                }
                if self.fill()? == 0 {
                    return Err(invalid("EOF in chunk size"));
                }
            };
            let line: Vec<u8> = self.buf.drain(..line_end + 2).collect();
            let size_str = String::from_utf8_lossy(&line[..line_end]).to_string();
            let size_str = size_str
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            let size = usize::from_str_radix(&size_str, 16)
                .map_err(|_| invalid(&format!("bad chunk size {size_str:?}")))?;
            if size == 0 {
                // trailers until empty line
                loop {
                    let end = loop {
                        if let Some(p) = find(&self.buf, b"\r\n") {
                            break p;
                        }
                        if self.fill()? == 0 {
                            return Err(invalid("EOF in trailers"));
                        }
                    };
                    self.buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(invalid("EOF in chunk"));
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request on a fresh connection.
pub fn request_once(
    sock: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
) -> io::Result<Response> {
    let mut c = Conn::connect(sock)?;
    c.request(method, target, body)
}

/// Raw bytes on a fresh connection, then read one response.
pub fn raw_once(sock: &Path, bytes: &[u8]) -> io::Result<Response> {
    let mut c = Conn::connect(sock)?;
    c.send_raw(bytes)?;
    c.read_response()
}

/// Serialise a response to JSON (used by the other-uid helper binary to hand it back).
pub fn response_to_json(r: &Response) -> serde_json::Value {
    use base64::Engine as _;
    serde_json::json!({
        "status": r.status,
        "reason": r.reason,
        "version": r.version,
        "headers": r.headers.iter().map(|(k, v)| serde_json::json!([k, v])).collect::<Vec<_>>(),
        "body_b64": base64::engine::general_purpose::STANDARD.encode(&r.body),
        "chunked": r.chunked,
    })
}

pub fn response_from_json(v: &serde_json::Value) -> Option<Response> {
    use base64::Engine as _;
    let headers = v["headers"]
        .as_array()?
        .iter()
        .map(|h| {
            Some((
                h.get(0)?.as_str()?.to_owned(),
                h.get(1)?.as_str()?.to_owned(),
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Response {
        status: u16::try_from(v["status"].as_u64()?).ok()?,
        reason: v["reason"].as_str()?.to_owned(),
        version: v["version"].as_str()?.to_owned(),
        headers,
        body: base64::engine::general_purpose::STANDARD
            .decode(v["body_b64"].as_str()?)
            .ok()?,
        chunked: v["chunked"].as_bool()?,
    })
}
