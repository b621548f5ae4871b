//! Just enough HTTP/1.1 framing for the test peers: heads, content-length and chunked bodies.
//! Deliberately separate from hyper so the peers see exactly what is on the wire.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A parsed message head.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    /// The start line (request line or status line).
    pub start: String,
    /// Header names (lowercased) and values.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// The framing of a request body.
pub(crate) fn request_framing(head: &Head) -> io::Result<Framing> {
    if head.has_token("transfer-encoding", "chunked") {
        return Ok(Framing::Chunked);
    }
    match head.header("content-length") {
        Some(v) => v
            .trim()
            .parse()
            .map(Framing::Length)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length")),
        None => Ok(Framing::Length(0)),
    }
}

/// The framing of a response body to a request with `method`.
pub(crate) fn response_framing(method: &str, status: u16, head: &Head) -> io::Result<Framing> {
    if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 || status < 200 {
        return Ok(Framing::Length(0));
    }
    if head.has_token("transfer-encoding", "chunked") {
        return Ok(Framing::Chunked);
    }
    match head.header("content-length") {
        Some(v) => v
            .trim()
            .parse()
            .map(Framing::Length)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length")),
        None => Ok(Framing::UntilClose),
    }
}

/// Reads more bytes into `buf`. EOF is an `UnexpectedEof` error.
pub(crate) async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> io::Result<()> {
    buf.reserve(64 * 1024);
    match r.read_buf(buf).await? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

/// Reads a head. `Ok(None)` on a clean EOF before any byte of it.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Option<Head>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let raw = buf.split_to(end + 4);
            return parse_head(&raw[..end]).map(Some);
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        match fill(r, buf).await {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && buf.is_empty() => {
                return Ok(None);
            }
            other => other?,
        }
    }
}

fn parse_head(raw: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "head is not utf-8"))?;
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for line in lines {
        let Some((n, v)) = line.split_once(':') else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad header line",
            ));
        };
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok(Head { start, headers })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_line<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> io::Result<String> {
    loop {
        if let Some(end) = find(buf, b"\r\n") {
            let line = buf.split_to(end + 2);
            return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
        }
        fill(r, buf).await?;
    }
}

/// Reads a body, handing each piece to `on_data`. Returns the trailers (chunked only).
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    framing: Framing,
    mut on_data: impl FnMut(&[u8]),
) -> io::Result<Vec<(String, String)>> {
    match framing {
        Framing::Length(mut left) => {
            while left > 0 {
                if buf.is_empty() {
                    fill(r, buf).await?;
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                on_data(&buf[..n]);
                buf.advance(n);
                left -= n as u64;
            }
            Ok(Vec::new())
        }
        Framing::UntilClose => loop {
            if !buf.is_empty() {
                on_data(buf);
                buf.clear();
            }
            match fill(r, buf).await {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
                other => other?,
            }
        },
        Framing::Chunked => {
            loop {
                let line = read_line(r, buf).await?;
                let size = line.split(';').next().unwrap_or_default().trim();
                let mut left = u64::from_str_radix(size, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if left == 0 {
                    break;
                }
                while left > 0 {
                    if buf.is_empty() {
                        fill(r, buf).await?;
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    on_data(&buf[..n]);
                    buf.advance(n);
                    left -= n as u64;
                }
                if !read_line(r, buf).await?.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk end"));
                }
            }
            let mut trailers = Vec::new();
            loop {
                let line = read_line(r, buf).await?;
                if line.is_empty() {
                    return Ok(trailers);
                }
                if let Some((n, v)) = line.split_once(':') {
                    trailers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
        }
    }
}

/// The reason phrase for the statuses tests use.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
