//! Downstream clients for tests.
//!
//! - [`H1Client`]: raw HTTP/1.1 over TCP or TLS. Sends exactly the bytes asked for (partial
//!   bodies, pipelined requests), reads responses, and leaves by FIN ([`H1Client::fin`]) or RST
//!   ([`H1Client::rst`]).
//! - [`H2Client`]: HTTP/2 on the `h2` crate (h2c prior knowledge or TLS with ALPN `h2`). A stream
//!   can be reset ([`H2Stream::reset`]) or abandoned ([`H2Stream::abandon`]); the whole connection
//!   can be killed with a TCP RST ([`H2Client::kill`]).
//! - [`HttpClient`]: a hyper client for ordinary requests (HTTP/1.1, h2c, either over TLS).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;

use crate::BoxError;
use crate::h1wire;
use crate::net::{self, BoxIo, SocketHandle};

/// A response head read by [`H1Client`].
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Header names (lowercase) and values, in wire order.
    pub headers: Vec<(String, String)>,
    head: h1wire::Head,
}

impl ResponseHead {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// Every value of header `name` (lowercase).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// How a connection ended, as seen by a client reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// A read returned 0.
    Eof,
    /// A read failed (ECONNRESET).
    Reset,
    /// Nothing happened within the time allowed.
    StillOpen,
}

/// A raw HTTP/1.1 client.
#[derive(Debug)]
pub struct H1Client {
    rd: ReadHalf<BoxIo>,
    wr: WriteHalf<BoxIo>,
    buf: BytesMut,
    handle: SocketHandle,
}

impl H1Client {
    /// Connects over cleartext TCP.
    pub async fn connect(addr: SocketAddr) -> Result<H1Client, BoxError> {
        Self::connect_inner(addr, None).await
    }

    /// Connects over cleartext TCP with a receive buffer of `bytes` (fixed: the kernel does not
    /// grow it), for a client whose slowness the sockets between it and an upstream do not hide.
    pub async fn connect_with_window(addr: SocketAddr, bytes: u32) -> Result<H1Client, BoxError> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_recv_buffer_size(bytes)?;
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let handle = net::SocketHandle::of(&tcp)?;
        Ok(Self::over(Box::new(tcp), handle))
    }

    /// Connects over TLS (verifying `localhost` against the config's roots).
    pub async fn connect_tls(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<H1Client, BoxError> {
        Self::connect_inner(addr, Some(tls)).await
    }

    /// Connects over TLS, asking for and verifying `server_name`.
    pub async fn connect_tls_as(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<H1Client, BoxError> {
        let (io, handle, _) = net::connect_as(addr, Some(tls), server_name).await?;
        Ok(Self::over(io, handle))
    }

    async fn connect_inner(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<H1Client, BoxError> {
        let (io, handle, _) = net::connect(addr, tls).await?;
        Ok(Self::over(io, handle))
    }

    fn over(io: net::BoxIo, handle: net::SocketHandle) -> H1Client {
        let (rd, wr) = tokio::io::split(io);
        H1Client {
            rd,
            wr,
            buf: BytesMut::new(),
            handle,
        }
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wr.write_all(bytes).await?;
        self.wr.flush().await
    }

    /// Writes a request head (adding `host: localhost` unless given) and `body`. If
    /// `content_length` is given it is declared even when `body` is shorter (a partial upload);
    /// otherwise a non-empty body gets its own length.
    pub async fn send_request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        content_length: Option<u64>,
        body: &[u8],
    ) -> io::Result<()> {
        let mut h = format!("{method} {target} HTTP/1.1\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            h.push_str("host: localhost\r\n");
        }
        for (n, v) in headers {
            h.push_str(&format!("{n}: {v}\r\n"));
        }
        match content_length {
            Some(n) => h.push_str(&format!("content-length: {n}\r\n")),
            None if !body.is_empty() => h.push_str(&format!("content-length: {}\r\n", body.len())),
            None => {}
        }
        h.push_str("\r\n");
        let mut msg = h.into_bytes();
        msg.extend_from_slice(body);
        self.send_raw(&msg).await
    }

    /// Reads the next response head, including 1xx heads.
    pub async fn read_head(&mut self) -> Result<ResponseHead, BoxError> {
        let head = h1wire::read_head(&mut self.rd, &mut self.buf)
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let status = head
            .start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {:?}", head.start))?;
        Ok(ResponseHead {
            status,
            headers: head.headers.clone(),
            head,
        })
    }

    /// Reads the next final (non-1xx) response head.
    pub async fn read_final_head(&mut self) -> Result<ResponseHead, BoxError> {
        loop {
            let h = self.read_head().await?;
            if !(100..200).contains(&h.status) {
                return Ok(h);
            }
        }
    }

    /// Reads the body of the response `head` to a `method` request. Fails if the connection ends
    /// before the body's framing completes (a truncated body).
    pub async fn read_body(
        &mut self,
        method: &str,
        head: &ResponseHead,
    ) -> Result<Bytes, BoxError> {
        let framing = h1wire::response_framing(method, head.status, &head.head)?;
        let mut body = BytesMut::new();
        h1wire::read_body(&mut self.rd, &mut self.buf, framing, |d| {
            body.extend_from_slice(d)
        })
        .await?;
        Ok(body.freeze())
    }

    /// Reads `n` body bytes raw (no de-chunking), for watching a stream arrive.
    pub async fn read_exact_raw(&mut self, n: usize) -> io::Result<Bytes> {
        while self.buf.len() < n {
            h1wire::fill(&mut self.rd, &mut self.buf).await?;
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// Reads raw bytes until at least one more arrives.
    pub async fn read_some_raw(&mut self) -> io::Result<Bytes> {
        if self.buf.is_empty() {
            h1wire::fill(&mut self.rd, &mut self.buf).await?;
        }
        Ok(self.buf.split().freeze())
    }

    /// Sends a GET and reads the whole response.
    pub async fn get(&mut self, target: &str) -> Result<(ResponseHead, Bytes), BoxError> {
        self.send_request("GET", target, &[], None, b"").await?;
        let head = self.read_final_head().await?;
        let body = self.read_body("GET", &head).await?;
        Ok((head, body))
    }

    /// Sends FIN (`shutdown(SHUT_WR)`) and keeps the socket open for reading.
    pub fn fin(&self) -> io::Result<()> {
        self.handle.shutdown_write()
    }

    /// Resets the connection: SO_LINGER 0, then close.
    pub fn rst(self) -> io::Result<()> {
        self.handle.rst_on_close()?;
        drop(self);
        Ok(())
    }

    /// Reads and discards until the server closes or resets, for at most `timeout`.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Closed {
        let wait = async {
            let mut b = [0u8; 16 * 1024];
            loop {
                match self.rd.read(&mut b).await {
                    Ok(0) => return Closed::Eof,
                    Ok(_) => {}
                    Err(_) => return Closed::Reset,
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Closed::StillOpen)
    }
}

/// A raw HTTP/2 client connection.
#[derive(Debug)]
pub struct H2Client {
    send: SendRequest<Bytes>,
    conn: JoinHandle<Result<(), h2::Error>>,
    handle: SocketHandle,
    scheme: &'static str,
}

impl Drop for H2Client {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl H2Client {
    /// Connects with h2c prior knowledge.
    pub async fn connect(addr: SocketAddr) -> Result<H2Client, BoxError> {
        Self::connect_inner(addr, None).await
    }

    /// Connects over TLS; the config must offer ALPN `h2` and the server must pick it.
    pub async fn connect_tls(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<H2Client, BoxError> {
        Self::connect_inner(addr, Some(tls)).await
    }

    /// Connects over TLS, asking for and verifying `server_name`; ALPN must pick `h2`.
    pub async fn connect_tls_as(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<H2Client, BoxError> {
        Self::connect_inner_as(addr, Some(tls), server_name).await
    }

    async fn connect_inner(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<H2Client, BoxError> {
        Self::connect_inner_as(addr, tls, "localhost").await
    }

    async fn connect_inner_as(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        server_name: &str,
    ) -> Result<H2Client, BoxError> {
        let is_tls = tls.is_some();
        let (io, handle, alpn) = net::connect_as(addr, tls, server_name).await?;
        if is_tls && alpn.as_deref() != Some(crate::tls::ALPN_H2) {
            return Err("server did not choose ALPN h2".into());
        }
        let (send, conn) = h2::client::handshake(io).await?;
        let conn = tokio::spawn(conn);
        Ok(H2Client {
            send,
            conn,
            handle,
            scheme: if is_tls { "https" } else { "http" },
        })
    }

    /// Opens a stream. With `end_of_stream` the request has no body; otherwise send it with
    /// [`H2Stream::send_data`].
    pub async fn start(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Result<H2Stream, BoxError> {
        let mut b = Request::builder()
            .method(Method::from_bytes(method.as_bytes())?)
            .uri(format!("{}://localhost{path}", self.scheme));
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(())?;
        self.send = self.send.clone().ready().await?;
        let (response, send) = self.send.send_request(req, end_of_stream)?;
        Ok(H2Stream {
            id: u32::from(send.stream_id()),
            response: Some(response),
            send: Some(send),
            recv: None,
        })
    }

    /// A GET, read in full: status, headers, body.
    pub async fn get(&mut self, path: &str) -> Result<(http::response::Parts, Bytes), BoxError> {
        let mut s = self.start("GET", path, &[], true).await?;
        let parts = s.response().await?;
        let body = s.read_to_end().await?;
        Ok((parts, body))
    }

    /// Kills the whole connection: with `rst`, a TCP RST (SO_LINGER 0); else a FIN both ways.
    /// No GOAWAY is sent.
    pub fn kill(self, rst: bool) -> io::Result<()> {
        if rst {
            self.handle.rst_on_close()?;
        } else {
            self.handle.shutdown_both()?;
        }
        self.conn.abort();
        // Dropping closes the last fds once the aborted task has dropped the connection.
        drop(self);
        Ok(())
    }

    /// True once the connection task has ended.
    pub fn is_closed(&self) -> bool {
        self.conn.is_finished()
    }
}

/// One request stream of an [`H2Client`].
#[derive(Debug)]
pub struct H2Stream {
    /// The stream id.
    pub id: u32,
    response: Option<ResponseFuture>,
    send: Option<SendStream<Bytes>>,
    recv: Option<RecvStream>,
}

impl H2Stream {
    /// Sends request body bytes (buffered by h2 beyond the flow-control window).
    pub fn send_data(
        &mut self,
        data: impl Into<Bytes>,
        end_of_stream: bool,
    ) -> Result<(), h2::Error> {
        match self.send.as_mut() {
            Some(s) => s.send_data(data.into(), end_of_stream),
            None => Err(h2::Error::from(Reason::STREAM_CLOSED)),
        }
    }

    /// Waits for the response head.
    pub async fn response(&mut self) -> Result<http::response::Parts, h2::Error> {
        let Some(fut) = self.response.take() else {
            return Err(h2::Error::from(Reason::PROTOCOL_ERROR));
        };
        let (parts, recv) = fut.await?.into_parts();
        self.recv = Some(recv);
        Ok(parts)
    }

    /// The next response body chunk (`None` at the end). Releases flow-control capacity.
    pub async fn data(&mut self) -> Option<Result<Bytes, h2::Error>> {
        let recv = self.recv.as_mut()?;
        let r = recv.data().await;
        if let Some(Ok(d)) = &r {
            let _ = recv.flow_control().release_capacity(d.len());
        }
        r
    }

    /// Reads the rest of the response body.
    pub async fn read_to_end(&mut self) -> Result<Bytes, h2::Error> {
        let mut body = BytesMut::new();
        while let Some(d) = self.data().await {
            body.extend_from_slice(&d?);
        }
        Ok(body.freeze())
    }

    /// The response trailers, after the body.
    pub async fn trailers(&mut self) -> Result<Option<HeaderMap>, h2::Error> {
        match self.recv.as_mut() {
            Some(r) => r.trailers().await,
            None => Ok(None),
        }
    }

    /// Sends RST_STREAM with `reason` and drops every handle of the stream.
    pub fn reset(mut self, reason: Reason) {
        if let Some(s) = self.send.as_mut() {
            s.send_reset(reason);
        }
    }

    /// Drops every handle; h2 then resets the stream with CANCEL if it is still open.
    pub fn abandon(self) {}
}

/// The request body type of [`HttpClient`].
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// A complete request body.
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// An empty request body.
pub fn empty() -> ReqBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Which protocol [`HttpClient`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (h2c prior knowledge in cleartext, ALPN `h2` over TLS).
    H2,
}

#[derive(Debug)]
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// An ordinary hyper client on one connection.
#[derive(Debug)]
pub struct HttpClient {
    sender: Sender,
    conn: JoinHandle<()>,
    scheme: &'static str,
}

impl Drop for HttpClient {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl HttpClient {
    /// Connects with `proto`, over TLS when `tls` is given (its ALPN should match `proto`).
    pub async fn connect(
        addr: SocketAddr,
        proto: Proto,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<HttpClient, BoxError> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (io, _handle, _) = net::connect(addr, tls).await?;
        let io = TokioIo::new(io);
        let (sender, conn) = match proto {
            Proto::Http1 => {
                let (s, c) = hyper::client::conn::http1::handshake(io).await?;
                (
                    Sender::H1(s),
                    tokio::spawn(async move {
                        let _ = c.await;
                    }),
                )
            }
            Proto::H2 => {
                let (s, c) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                (
                    Sender::H2(s),
                    tokio::spawn(async move {
                        let _ = c.await;
                    }),
                )
            }
        };
        Ok(HttpClient {
            sender,
            conn,
            scheme,
        })
    }

    /// A request builder for `path` with the URI form and `host` this protocol needs.
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        match self.sender {
            Sender::H1(_) => Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost"),
            Sender::H2(_) => Request::builder()
                .method(method)
                .uri(format!("{}://localhost{path}", self.scheme)),
        }
    }

    /// Sends a request.
    pub async fn send(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn fetch(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<(http::response::Parts, Bytes, Option<HeaderMap>), BoxError> {
        let (parts, body) = self.send(req).await?.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((parts, collected.to_bytes(), trailers))
    }

    /// A GET read in full.
    pub async fn get(&mut self, path: &str) -> Result<(http::response::Parts, Bytes), BoxError> {
        let req = self.request(Method::GET, path).body(empty())?;
        let (p, b, _) = self.fetch(req).await?;
        Ok((p, b))
    }
}

/// A request body of `len` [`crate::pattern`] bytes, produced in 64 KiB frames as the connection
/// takes them (nothing is buffered up front).
pub fn pattern_body(len: u64) -> ReqBody {
    PatternBody {
        left: len,
        block: crate::pattern(251 * 256),
    }
    .boxed()
}

#[derive(Debug)]
struct PatternBody {
    left: u64,
    block: Bytes,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(self.block.len());
        self.left -= n as u64;
        let data = self.block.slice(..n);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}
