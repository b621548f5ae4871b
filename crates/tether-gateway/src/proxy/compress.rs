//! Response compression: the coding a client accepts (its `Accept-Encoding`), whether a response
//! is compressed at all, and its body compressed chunk by chunk, each chunk flushed so that a
//! stream (server-sent events, a long poll) reaches the client as it comes.

use std::io::{self, Write};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body::Frame;

use crate::config::{Compression, ContentCoding};
use crate::proxy::headers::list_elements;

/// gzip level: about zlib's default ratio at less CPU, for a proxy compressing as it streams.
const GZIP_LEVEL: u32 = 5;
/// Brotli quality and window (2^18 bytes): well above gzip's ratio on text at a similar cost,
/// with a few hundred KiB of state per response rather than brotli's default megabytes.
const BROTLI_QUALITY: u32 = 4;
const BROTLI_WINDOW_BITS: u32 = 18;
/// zstd level and window (2^18 bytes): zstd's default level, its state bounded as brotli's.
const ZSTD_LEVEL: i32 = 3;
const ZSTD_WINDOW_LOG: u32 = 18;

/// The coding a request's response may be compressed with: the one of `c.encodings` the client
/// gives the highest `q` (`*` counts for codings it does not name), ties going to tether's order.
/// `None` for a client that names none, for `HEAD` (no body) and for range requests.
pub fn negotiate(c: &Compression, method: &Method, headers: &HeaderMap) -> Option<ContentCoding> {
    if method == Method::HEAD || headers.contains_key(header::RANGE) {
        return None;
    }
    let mut best: Option<(ContentCoding, u16)> = None;
    for &coding in &c.encodings {
        let q = accepted(headers, coding.token());
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((coding, q));
        }
    }
    best.map(|(coding, _)| coding)
}

/// The client's `q` for `token`, in thousandths: its own entry's, else `*`'s, else 0.
fn accepted(headers: &HeaderMap, token: &str) -> u16 {
    let mut star = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for element in value.split(',') {
            let mut parts = element.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                .map(qvalue)
                .next()
                .unwrap_or(Some(1000));
            let Some(q) = q else { continue };
            if name.eq_ignore_ascii_case(token) {
                return q;
            }
            if name == "*" {
                star = Some(q);
            }
        }
    }
    star.unwrap_or(0)
}

/// An RFC 9110 qvalue in thousandths; `None` when it is not one.
fn qvalue(s: &str) -> Option<u16> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    (thousandths <= 1000).then_some(thousandths)
}

/// Whether a response with `status` and `headers` is compressed: it has a body, is not already
/// encoded or a range, does not forbid transformation, is of a listed type and is not declared
/// smaller than `min_bytes` (or empty).
pub fn applies(c: &Compression, status: StatusCode, headers: &HeaderMap) -> bool {
    if status.is_informational()
        || matches!(
            status,
            StatusCode::NO_CONTENT | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
        )
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    if headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return false;
    }
    let no_transform = list_elements(headers, &header::CACHE_CONTROL)
        .any(|d| d.eq_ignore_ascii_case("no-transform"));
    if no_transform {
        return false;
    }
    let Some(media) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    else {
        return false;
    };
    let listed = c.types.iter().any(|t| match t.strip_suffix("/*") {
        Some(ty) => media.split_once('/').is_some_and(|(m, _)| m == ty),
        None => *t == media,
    });
    if !listed {
        return false;
    }
    match headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(len) => len > 0 && len >= c.min_bytes,
        None => true,
    }
}

/// The response's headers for its body compressed with `coding`: `Content-Encoding` set, the
/// length and range support dropped (both were the uncompressed body's), `Vary:
/// Accept-Encoding` so that caches keep the versions apart, and a strong `ETag` made weak (the
/// bytes differ, the content does not).
pub fn mark(headers: &mut HeaderMap, coding: ContentCoding) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    let varies = list_elements(headers, &header::VARY)
        .any(|v| v == "*" || v.eq_ignore_ascii_case("accept-encoding"));
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if let Some(etag) = headers.get(header::ETAG)
        && etag.as_bytes().first() == Some(&b'"')
    {
        let mut weak = Vec::with_capacity(etag.len() + 2);
        weak.extend_from_slice(b"W/");
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&weak) {
            headers.insert(header::ETAG, v);
        }
    }
}

/// A response body being compressed.
pub struct Compressing {
    encoder: Option<Encoder>,
    /// The upstream's trailers, sent after the compressed body's end.
    trailers: Option<HeaderMap>,
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(Box<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl std::fmt::Debug for Compressing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressing")
            .field("done", &self.encoder.is_none())
            .finish()
    }
}

impl Compressing {
    /// A body compressed with `coding`.
    pub fn new(coding: ContentCoding) -> io::Result<Compressing> {
        let encoder = match coding {
            ContentCoding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(GZIP_LEVEL),
            )),
            ContentCoding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                BROTLI_QUALITY,
                BROTLI_WINDOW_BITS,
            ))),
            ContentCoding::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
                e.window_log(ZSTD_WINDOW_LOG)?;
                // Lets a decoder check the body it rebuilt.
                e.include_checksum(true)?;
                Encoder::Zstd(Box::new(e))
            }
        };
        Ok(Compressing {
            encoder: Some(encoder),
            trailers: None,
        })
    }

    /// The frame to send for the upstream's `frame`; `last` when the upstream body ends with it.
    /// Trailers are held back until the compressed body's end has been sent.
    pub fn frame(&mut self, frame: Frame<Bytes>, last: bool) -> io::Result<Frame<Bytes>> {
        match frame.into_data() {
            Ok(data) => {
                let mut out = self.compress(&data)?;
                if last {
                    out.extend_from_slice(&self.finish()?);
                }
                Ok(Frame::data(Bytes::from(out)))
            }
            Err(frame) => {
                self.trailers = frame.into_trailers().ok();
                Ok(Frame::data(Bytes::from(self.finish()?)))
            }
        }
    }

    /// Trailers held back by [`Compressing::frame`], once.
    pub fn take_trailers(&mut self) -> Option<HeaderMap> {
        self.trailers.take()
    }

    /// Whether trailers wait to be sent.
    pub fn has_trailers(&self) -> bool {
        self.trailers.is_some()
    }

    /// Whether the compressed body's end still has to be sent.
    pub fn unfinished(&self) -> bool {
        self.encoder.is_some()
    }

    fn compress(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(Vec::new());
        };
        match encoder {
            Encoder::Gzip(e) => flushed(e, data, flate2::write::GzEncoder::get_mut),
            Encoder::Brotli(e) => flushed(&mut **e, data, brotli::CompressorWriter::get_mut),
            Encoder::Zstd(e) => flushed(&mut **e, data, zstd::stream::write::Encoder::get_mut),
        }
    }

    /// The end of the compressed body (once; empty after).
    pub fn finish(&mut self) -> io::Result<Vec<u8>> {
        match self.encoder.take() {
            None => Ok(Vec::new()),
            Some(Encoder::Gzip(e)) => e.finish(),
            Some(Encoder::Brotli(e)) => Ok(e.into_inner()),
            Some(Encoder::Zstd(e)) => e.finish(),
        }
    }
}

/// `data` through encoder `e`, flushed, and the compressed bytes taken from the buffer
/// `output` reaches inside it.
fn flushed<W: Write>(
    e: &mut W,
    data: &[u8],
    output: fn(&mut W) -> &mut Vec<u8>,
) -> io::Result<Vec<u8>> {
    e.write_all(data)?;
    e.flush()?;
    Ok(std::mem::take(output(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn pick(accept: &str) -> Option<&'static str> {
        negotiate(
            &Compression::default(),
            &Method::GET,
            &headers(&[("accept-encoding", accept)]),
        )
        .map(ContentCoding::token)
    }

    #[test]
    fn the_client_q_values_choose_and_ties_go_to_the_configured_order() {
        assert_eq!(pick("gzip, deflate, br"), Some("br"));
        assert_eq!(pick("gzip"), Some("gzip"));
        assert_eq!(pick("br;q=0.5, gzip;q=0.8"), Some("gzip"));
        assert_eq!(pick("BR;Q=1.0, gzip;q=0.999"), Some("br"));
        assert_eq!(pick("br;q=0, gzip;q=0"), None);
        assert_eq!(pick("*"), Some("br"));
        assert_eq!(pick("*;q=0.1, gzip"), Some("gzip"));
        assert_eq!(pick("br;q=0, *"), Some("gzip"));
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("br;q=2, gzip;q=0.x"), None, "bad q-values are ignored");
        assert_eq!(pick(""), None);
        let none = negotiate(&Compression::default(), &Method::GET, &HeaderMap::new());
        assert_eq!(none, None, "no Accept-Encoding: nothing is assumed");
        let h = headers(&[("accept-encoding", "gzip")]);
        assert_eq!(negotiate(&Compression::default(), &Method::HEAD, &h), None);
        let ranged = headers(&[("accept-encoding", "gzip"), ("range", "bytes=0-9")]);
        assert_eq!(
            negotiate(&Compression::default(), &Method::GET, &ranged),
            None
        );
    }

    #[test]
    fn only_listed_unencoded_responses_with_a_body_are_compressed() {
        let c = Compression::default();
        let ok = |pairs: &[(&str, &str)]| applies(&c, StatusCode::OK, &headers(pairs));
        assert!(ok(&[("content-type", "text/html; charset=utf-8")]));
        assert!(ok(&[("content-type", "Application/JSON")]));
        assert!(ok(&[
            ("content-type", "text/css"),
            ("content-length", "1024")
        ]));
        assert!(!ok(&[
            ("content-type", "text/css"),
            ("content-length", "1023")
        ]));
        assert!(!ok(&[("content-type", "image/png")]));
        assert!(!ok(&[]), "no type: not compressed");
        assert!(!ok(&[
            ("content-type", "text/html"),
            ("content-encoding", "gzip")
        ]));
        assert!(ok(&[
            ("content-type", "text/html"),
            ("content-encoding", "identity")
        ]));
        assert!(!ok(&[
            ("content-type", "text/html"),
            ("cache-control", "public, No-Transform")
        ]));
        let html = headers(&[("content-type", "text/html")]);
        for status in [101, 204, 206, 304] {
            assert!(!applies(&c, StatusCode::from_u16(status).unwrap(), &html));
        }
        assert!(applies(&c, StatusCode::NOT_FOUND, &html));
        let wild = Compression {
            types: vec!["text/*".into()],
            min_bytes: 0,
            ..Compression::default()
        };
        assert!(applies(
            &wild,
            StatusCode::OK,
            &headers(&[("content-type", "text/x-anything")])
        ));
        assert!(!applies(
            &wild,
            StatusCode::OK,
            &headers(&[("content-type", "text/plain"), ("content-length", "0")])
        ));
    }

    #[test]
    fn a_compressed_response_is_marked_and_its_length_and_strong_etag_go() {
        let mut h = headers(&[
            ("content-type", "text/html"),
            ("content-length", "5000"),
            ("accept-ranges", "bytes"),
            ("etag", "\"v1\""),
            ("vary", "origin"),
        ]);
        mark(&mut h, ContentCoding::Gzip);
        assert_eq!(h.get("content-encoding").unwrap(), "gzip");
        assert!(h.get("content-length").is_none() && h.get("accept-ranges").is_none());
        assert_eq!(h.get("etag").unwrap(), "W/\"v1\"");
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["origin", "accept-encoding"]);
        let mut h = headers(&[("vary", "Accept-Encoding"), ("etag", "W/\"v2\"")]);
        mark(&mut h, ContentCoding::Brotli);
        assert_eq!(h.get_all("vary").iter().count(), 1);
        assert_eq!(h.get("etag").unwrap(), "W/\"v2\"");
    }

    fn decode(coding: ContentCoding, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match coding {
            ContentCoding::Gzip => {
                flate2::read::GzDecoder::new(bytes)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            ContentCoding::Brotli => {
                brotli::Decompressor::new(bytes, 4096)
                    .read_to_end(&mut out)
                    .unwrap();
            }
            ContentCoding::Zstd => {
                zstd::stream::read::Decoder::new(bytes)
                    .unwrap()
                    .read_to_end(&mut out)
                    .unwrap();
            }
        }
        out
    }

    #[test]
    fn each_chunk_is_decodable_as_it_comes_and_the_whole_body_round_trips() {
        for coding in [
            ContentCoding::Gzip,
            ContentCoding::Brotli,
            ContentCoding::Zstd,
        ] {
            let mut c = Compressing::new(coding).unwrap();
            let chunks = ["data: one\n\n", "data: two\n\n", "data: three\n\n"];
            let mut sent = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                let f = c
                    .frame(Frame::data(Bytes::from_static(chunk.as_bytes())), false)
                    .unwrap();
                sent.extend_from_slice(f.data_ref().unwrap());
                // Flushed: what was sent so far decodes to every chunk so far.
                let mut partial = Vec::new();
                let so_far: &[u8] = &sent;
                let _ = match coding {
                    ContentCoding::Gzip => {
                        flate2::read::GzDecoder::new(so_far).read_to_end(&mut partial)
                    }
                    ContentCoding::Brotli => {
                        brotli::Decompressor::new(so_far, 4096).read_to_end(&mut partial)
                    }
                    ContentCoding::Zstd => zstd::stream::read::Decoder::new(so_far)
                        .unwrap()
                        .read_to_end(&mut partial),
                };
                assert_eq!(partial, chunks[..=i].concat().as_bytes(), "{coding:?}");
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let end = c.frame(Frame::trailers(trailers), false).unwrap();
            sent.extend_from_slice(end.data_ref().unwrap());
            assert!(!c.unfinished() && c.has_trailers());
            assert_eq!(decode(coding, &sent), chunks.concat().as_bytes());
            assert_eq!(c.take_trailers().unwrap()["grpc-status"], "0");
        }
    }
}
