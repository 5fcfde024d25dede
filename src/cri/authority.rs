//! Accept every `:authority` containerd accepts.
//!
//! gRPC C-core clients (Python `grpcio` from PyPI, for example) that dial `unix:/run/x.sock` send
//! the socket path percent-encoded as `:authority` (`run%2Fx.sock`); grpc-go clients (kubelet,
//! crictl) send `localhost`. containerd (grpc-go) does not look at `:authority`. The `h2` crate
//! under tonic parses it as a URI authority, where `%` outside user info is invalid (an empty
//! one is refused too), and resets the stream with `PROTOCOL_ERROR`; neither h2, hyper nor tonic
//! has a switch for it.
//!
//! [`AuthorityFix`] wraps each accepted connection on the read side, before h2 sees the bytes.
//! It follows the HTTP/2 frame layer and HPACK-decodes every request header block (the client's
//! dynamic table must be tracked from the first block on). A block whose `:authority` `http`
//! would refuse is re-encoded with `:authority: localhost`. Re-encoding cannot patch one field
//! in place: the client's literal may insert the value into its dynamic table, later blocks
//! index it, and a different length changes which entries the table evicts. So from the first
//! rewrite on, every header block of that connection is re-encoded from the decoded list, as
//! literals that never touch h2's dynamic table; h2's table stays as it was and nothing refers to
//! it any more. Connections that never need a rewrite (kubelet's) pass byte for byte.
//!
//! Anything that is not HTTP/2 as expected (no client preface, a malformed header frame) is left
//! for h2 to judge: the adapter stops looking and passes the rest through untouched, unless it
//! has already re-encoded, in which case it ends the connection with an error because h2 could
//! no longer decode that client's blocks.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{BufMut as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a refused `:authority` becomes: the value grpc-go clients send on unix sockets.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frame payload size every HTTP/2 peer accepts (initial SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// HPACK dynamic table size h2 allows clients (the protocol default; pullgate does not change
/// SETTINGS_HEADER_TABLE_SIZE). A client's size update above it is a decoding error.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Largest encoded header block (HEADERS plus CONTINUATION frames) the adapter buffers.
/// hyper's server refuses header lists above 16 KiB anyway; this only bounds memory.
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// Largest decoded header list (RFC 7541 sizes: name + value + 32 per field) the adapter keeps.
/// Bounds what a block of small indexed references to a large table entry can expand to.
pub const MAX_HEADER_LIST: usize = 1 << 20;
const READ_CHUNK: usize = 16 * 1024;

/// A connection whose read side has refused `:authority` values replaced; writes pass through.
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from the socket and not looked at yet.
    raw: BytesMut,
    /// Bytes looked at, for h2 to read.
    ready: BytesMut,
    scratch: Box<[u8]>,
    state: State,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    /// Set at the first rewrite: every later block is re-encoded too.
    transcoding: bool,
    eof: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the client connection preface, `n` bytes of it seen.
    Preface(usize),
    /// At a frame boundary.
    FrameStart,
    /// Inside the payload of a frame that needs no inspection: this many bytes left.
    Passing(usize),
    /// Not looking any more: everything passes as it is.
    Opaque,
}

/// A header block whose HEADERS frame came and whose END_HEADERS has not.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    fragment: BytesMut,
    /// The frames as received, for passing the block through unchanged.
    original: BytesMut,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        AuthorityFix {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            state: State::Preface(0),
            pending: None,
            decoder,
            transcoding: false,
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// True once this connection's header blocks are being re-encoded.
    pub fn is_rewriting(&self) -> bool {
        self.transcoding
    }

    /// Moves as much of `raw` to `ready` as can be judged now.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Opaque => {
                    let rest = self.raw.split();
                    self.ready.extend_from_slice(&rest);
                    return Ok(());
                }
                State::Preface(seen) => {
                    let n = (PREFACE.len() - seen).min(self.raw.len());
                    if n == 0 {
                        return Ok(());
                    }
                    if self.raw[..n] != PREFACE[seen..seen + n] {
                        // Not an HTTP/2 client: h2 will say so.
                        self.state = State::Opaque;
                        continue;
                    }
                    let part = self.raw.split_to(n);
                    self.ready.extend_from_slice(&part);
                    self.state = if seen + n == PREFACE.len() {
                        State::FrameStart
                    } else {
                        State::Preface(seen + n)
                    };
                }
                State::Passing(0) => self.state = State::FrameStart,
                State::Passing(left) => {
                    let n = left.min(self.raw.len());
                    if n == 0 {
                        return Ok(());
                    }
                    let part = self.raw.split_to(n);
                    self.ready.extend_from_slice(&part);
                    self.state = if n == left {
                        State::FrameStart
                    } else {
                        State::Passing(left - n)
                    };
                }
                State::FrameStart => {
                    if self.raw.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]);
                    let len = len as usize;
                    let kind = self.raw[3];
                    let flags = self.raw[4];
                    let stream_id =
                        u32::from_be_bytes([self.raw[5], self.raw[6], self.raw[7], self.raw[8]])
                            & 0x7fff_ffff;
                    let in_block = self.pending.is_some();
                    if kind != HEADERS && kind != CONTINUATION {
                        if in_block {
                            // Only CONTINUATION may follow a HEADERS frame without END_HEADERS.
                            self.give_up("frame interleaved in a header block", None)?;
                            continue;
                        }
                        let header = self.raw.split_to(FRAME_HEADER_LEN);
                        self.ready.extend_from_slice(&header);
                        self.state = State::Passing(len);
                        continue;
                    }
                    if (kind == CONTINUATION) != in_block {
                        self.give_up("CONTINUATION out of place", None)?;
                        continue;
                    }
                    let buffered = self.pending.as_ref().map_or(0, |p| p.original.len());
                    if buffered + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                        self.give_up("header block over the adapter's limit", None)?;
                        continue;
                    }
                    if self.raw.len() < FRAME_HEADER_LEN + len {
                        self.raw.reserve(FRAME_HEADER_LEN + len - self.raw.len());
                        return Ok(());
                    }
                    let frame = self.raw.split_to(FRAME_HEADER_LEN + len);
                    self.header_frame(kind, flags, stream_id, frame)?;
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        frame: BytesMut,
    ) -> io::Result<()> {
        let payload = &frame[FRAME_HEADER_LEN..];
        if kind == HEADERS {
            let Some(fragment) = headers_fragment(flags, payload) else {
                return self.give_up("malformed HEADERS padding", Some(&frame));
            };
            self.pending = Some(PendingBlock {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                fragment: BytesMut::from(fragment),
                original: frame.clone(),
            });
        } else {
            let Some(block) = self.pending.as_mut().filter(|p| p.stream_id == stream_id) else {
                return self.give_up("CONTINUATION on another stream", Some(&frame));
            };
            block.fragment.extend_from_slice(payload);
            block.original.extend_from_slice(&frame);
        }
        self.state = State::FrameStart;
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.pending.take() {
                self.finish_block(block)?;
            }
        }
        Ok(())
    }

    /// A complete header block: decoded to keep the client's table, then passed through or
    /// re-encoded.
    fn finish_block(&mut self, block: PendingBlock) -> io::Result<()> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut list_size = 0usize;
        let mut refused_authority: Option<Vec<u8>> = None;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            list_size = list_size.saturating_add(name.len() + value.len() + 32);
            if list_size > MAX_HEADER_LIST {
                return;
            }
            if &*name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
                refused_authority.get_or_insert_with(|| value.to_vec());
                fields.push((name.into_owned(), REPLACEMENT_AUTHORITY.to_vec()));
            } else {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        if let Err(e) = decoded {
            // h2 fails the connection on the same block (COMPRESSION_ERROR) when it still
            // shares the client's table; after a rewrite it would not, so end it here.
            return self.give_up(
                &format!("HPACK decoding failed: {e}"),
                Some(&block.original),
            );
        }
        if refused_authority.is_none() && !self.transcoding {
            self.ready.extend_from_slice(&block.original);
            return Ok(());
        }
        if list_size > MAX_HEADER_LIST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "header list too large to re-encode",
            ));
        }
        if let Some(value) = refused_authority {
            if !self.transcoding {
                tracing::debug!(
                    authority = %String::from_utf8_lossy(&value[..value.len().min(128)]),
                    "client :authority refused by h2: this connection's header blocks are re-encoded with :authority localhost"
                );
            }
        }
        self.transcoding = true;
        let mut encoded = BytesMut::new();
        for (name, value) in &fields {
            encode_literal(&mut encoded, name, value);
        }
        write_header_block(&mut self.ready, block.stream_id, block.end_stream, &encoded);
        Ok(())
    }

    /// Stops inspecting this connection. Before any rewrite h2 shares the client's HPACK state
    /// and judges the rest itself; after one it could not, so the connection ends. `offending`
    /// is a frame already taken off `raw`: it goes after the held-back block, in arrival order.
    fn give_up(&mut self, why: &str, offending: Option<&[u8]>) -> io::Result<()> {
        if self.transcoding {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("HTTP/2 stream after an :authority rewrite: {why}"),
            ));
        }
        tracing::debug!(reason = why, "connection passed to h2 uninspected");
        if let Some(block) = self.pending.take() {
            self.ready.extend_from_slice(&block.original);
        }
        if let Some(frame) = offending {
            self.ready.extend_from_slice(frame);
        }
        self.state = State::Opaque;
        Ok(())
    }

    /// At end of input, whatever was held back goes to h2 as it came (a truncated connection).
    fn flush_at_eof(&mut self) {
        if let Some(block) = self.pending.take() {
            self.ready.extend_from_slice(&block.original);
        }
        let rest = self.raw.split();
        self.ready.extend_from_slice(&rest);
    }
}

/// The header block fragment of a HEADERS frame payload (padding and priority removed), or
/// `None` when the padding does not fit.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*payload.first()?);
        start = 1;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    let end = payload.len().checked_sub(pad)?;
    payload.get(start..end)
}

/// HPACK integer (RFC 7541 §5.1) with `prefix` bits, high bits of the first octet from `first`.
fn encode_int(out: &mut BytesMut, first: u8, prefix: u8, mut value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    value -= max;
    while value >= 128 {
        out.put_u8((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.put_u8(value as u8);
}

/// "Literal Header Field without Indexing — New Name" (RFC 7541 §6.2.2), strings not Huffman
/// coded: the decoder's dynamic table is left alone.
fn encode_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0x00);
    for s in [name, value] {
        encode_int(out, 0x00, 7, s.len());
        out.put_slice(s);
    }
}

fn write_frame(out: &mut BytesMut, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream_id & 0x7fff_ffff);
    out.put_slice(payload);
}

/// One HEADERS frame, plus CONTINUATION frames when the block exceeds the frame size every
/// peer accepts.
fn write_header_block(out: &mut BytesMut, stream_id: u32, end_stream: bool, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME_PAYLOAD).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= END_HEADERS;
    }
    write_frame(out, HEADERS, flags, stream_id, first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        write_frame(out, CONTINUATION, flags, stream_id, chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                let part = this.ready.split_to(n);
                buf.put_slice(&part);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                this.flush_at_eof();
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_frame(&mut out, kind, flags, stream_id, payload);
        out.to_vec()
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[])
    }

    fn request(authority: &str, path: &str) -> Fields {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("x-request", path),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn encode(encoder: &mut loona_hpack::Encoder<'_>, fields: &Fields) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// Yields its input `step` bytes per read.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let n = this
                .step
                .min(buf.remaining())
                .min(this.data.len() - this.pos);
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    async fn run(input: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(Trickle {
            data: input.to_vec(),
            pos: 0,
            step,
        });
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        Ok(out)
    }

    /// Splits an HTTP/2 byte stream (after the preface) into frames and decodes header blocks
    /// as h2 would, with one table for the whole connection.
    fn h2_view(out: &[u8]) -> (Vec<(u8, u8, u32)>, Vec<Fields>) {
        assert!(out.starts_with(PREFACE), "preface passed through");
        let mut rest = &out[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut frames = Vec::new();
        let mut blocks = Vec::new();
        let mut block = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            let payload = &rest[9..9 + len];
            frames.push((kind, flags, stream));
            if kind == HEADERS || kind == CONTINUATION {
                let fragment = if kind == HEADERS {
                    headers_fragment(flags, payload).unwrap()
                } else {
                    payload
                };
                block.extend_from_slice(fragment);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        (frames, blocks)
    }

    fn with_authority(mut fields: Fields, authority: &str) -> Fields {
        for (n, v) in &mut fields {
            if n == b":authority" {
                *v = authority.as_bytes().to_vec();
            }
        }
        fields
    }

    #[tokio::test]
    async fn valid_authorities_pass_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        for (i, authority) in ["localhost", "containerd.invalid:80", "127.0.0.1"]
            .iter()
            .enumerate()
        {
            let block = encode(
                &mut enc,
                &request(authority, "/runtime.v1.RuntimeService/Version"),
            );
            input.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, &block));
            input.extend(frame(0x0, END_STREAM, 1 + 2 * i as u32, b"\0\0\0\0\0"));
        }
        for step in [1, 7, 4096] {
            assert_eq!(run(&input, step).await.unwrap(), input, "step {step}");
        }
    }

    /// HPACK as gRPC C-core writes it: new names and values inserted into the dynamic table
    /// ("literal with incremental indexing"), then referred to by index.
    fn lit_indexed(out: &mut Vec<u8>, name: &str, value: &str) {
        let mut b = BytesMut::new();
        b.put_u8(0x40);
        for s in [name, value] {
            encode_int(&mut b, 0, 7, s.len());
            b.put_slice(s.as_bytes());
        }
        out.extend_from_slice(&b);
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn refused_authority_is_rewritten_and_later_blocks_stay_in_sync() {
        let bad = "tmp%2Fpgp-x%2Fpullgate.sock";
        assert!(http::uri::Authority::try_from(bad).is_err());
        let version = "/runtime.v1.RuntimeService/Version";
        // 1: like C-core's first request. Table afterwards (newest first): te 62,
        // content-type 63, :authority 64, :path 65.
        let mut b1 = Vec::new();
        lit_indexed(&mut b1, ":path", version);
        lit_indexed(&mut b1, ":authority", bad);
        b1.extend([0x83, 0x86]); // static :method POST, :scheme http
        lit_indexed(&mut b1, "content-type", "application/grpc");
        lit_indexed(&mut b1, "te", "trailers");
        // 2: the same request, all by index.
        let b2 = vec![0xc1, 0xc0, 0x83, 0x86, 0xbf, 0xbe];
        // 3: a new path shifts every index by one.
        let mut b3 = Vec::new();
        lit_indexed(&mut b3, ":path", "/x");
        b3.extend([0xc1, 0x83, 0x86, 0xc0, 0xbf]);
        // 4: table size update to 0 (evicts all) and back, then literals again.
        let mut b4 = BytesMut::new();
        encode_int(&mut b4, 0x20, 5, 0);
        encode_int(&mut b4, 0x20, 5, 4096);
        let mut b4 = b4.to_vec();
        lit_indexed(&mut b4, ":path", "/y");
        lit_indexed(&mut b4, ":authority", "");
        b4.extend([0x83, 0x86]);
        // 5: a valid authority, after the rewrite began.
        let mut b5 = vec![0xbf, 0x83, 0x86]; // :path /y
        lit_indexed(&mut b5, ":authority", "localhost");
        let blocks_in = [b1, b2, b3, b4, b5];

        let mut input = PREFACE.to_vec();
        input.extend(settings());
        for (i, block) in blocks_in.iter().enumerate() {
            input.extend(frame(HEADERS, END_HEADERS, 1 + 2 * i as u32, block));
            input.extend(frame(0x0, END_STREAM, 1 + 2 * i as u32, b"\0\0\0\0\0"));
        }
        let common = [
            (":method", "POST"),
            (":scheme", "http"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        let v = |path: &'static str, authority: &'static str| {
            fields(&[
                (":path", path),
                (":authority", authority),
                common[0],
                common[1],
                common[2],
                common[3],
            ])
        };
        let expected = vec![
            v(version, "localhost"),
            v(version, "localhost"),
            fields(&[
                (":path", "/x"),
                (":authority", "localhost"),
                common[0],
                common[1],
                common[2],
                common[3],
            ]),
            fields(&[
                (":path", "/y"),
                (":authority", "localhost"),
                common[0],
                common[1],
            ]),
            fields(&[
                (":path", "/y"),
                common[0],
                common[1],
                (":authority", "localhost"),
            ]),
        ];
        // The client's own bytes would not decode as h2 needs them: block 2 refers to the
        // refused value.
        let mut client_view = loona_hpack::Decoder::new();
        let raw: Vec<Fields> = blocks_in
            .iter()
            .map(|b| client_view.decode(b).unwrap())
            .collect();
        assert_eq!(raw[1][1].1, bad.as_bytes());

        for step in [1, 3, 64, 4096] {
            let out = run(&input, step).await.unwrap();
            let (frames, blocks) = h2_view(&out);
            assert_eq!(blocks, expected, "step {step}");
            let kinds: Vec<_> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
            let mut want = vec![(0x4, 0, 0)];
            for i in 0..5u32 {
                want.extend([
                    (HEADERS, END_HEADERS, 1 + 2 * i),
                    (0x0, END_STREAM, 1 + 2 * i),
                ]);
            }
            assert_eq!(kinds, want, "step {step}");
        }
    }

    #[tokio::test]
    async fn blocks_before_the_first_rewrite_keep_their_bytes() {
        let mut b1 = Vec::new();
        lit_indexed(&mut b1, ":path", "/a");
        lit_indexed(&mut b1, ":authority", "localhost");
        let mut b2 = vec![0xbf]; // :path /a
        lit_indexed(&mut b2, ":authority", "a%2Fb");
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &b1));
        let first = input.len();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2));
        let out = run(&input, 2).await.unwrap();
        assert_eq!(out[..first], input[..first]);
        let (_, blocks) = h2_view(&out);
        assert_eq!(
            blocks,
            vec![
                fields(&[(":path", "/a"), (":authority", "localhost")]),
                fields(&[(":path", "/a"), (":authority", "localhost")]),
            ]
        );
    }

    #[tokio::test]
    async fn padding_priority_continuation_and_end_stream() {
        let bad = "run%2Fpullgate%2Fpullgate.sock";
        let mut enc = loona_hpack::Encoder::new();
        let req = request(bad, "/runtime.v1.RuntimeService/Version");
        let block = encode(&mut enc, &req);
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // priority: dependency 0, weight 16
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        // A big header (several frames once re-encoded), sent after the rewrite began.
        let mut big = request("localhost", "/x");
        big.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let big_block = encode(&mut enc, &big);
        let (c, d) = big_block.split_at(MAX_FRAME_PAYLOAD);
        input.extend(frame(HEADERS, 0, 3, c));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, d));
        for step in [1, 5000] {
            let out = run(&input, step).await.unwrap();
            let (frames, blocks) = h2_view(&out);
            assert_eq!(
                blocks,
                vec![with_authority(req.clone(), "localhost"), big.clone()]
            );
            assert_eq!(frames[0], (HEADERS, END_STREAM | END_HEADERS, 1));
            assert!(frames[1..]
                .iter()
                .all(|f| f.2 == 3 && (f.0 == HEADERS || f.0 == CONTINUATION)));
            assert_eq!(frames.last().unwrap().1, END_HEADERS);
            assert!(frames.len() >= 4, "{frames:?}");
        }
    }

    #[tokio::test]
    async fn not_http2_and_truncated_input_pass_unchanged() {
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(run(&http1, 3).await.unwrap(), http1);
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&mut enc, &request("a%2Fb", "/x"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(&frame(CONTINUATION, END_HEADERS, 1, &[0x82])[..5]);
        assert_eq!(run(&input, 2).await.unwrap(), input);
    }

    #[tokio::test]
    async fn protocol_violations_before_a_rewrite_are_left_to_h2() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&mut enc, &request("localhost", "/x"));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        input.extend(frame(0x0, 0, 1, b"data"));
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0xff, 0xff, 0xff, 0xff]));
        assert_eq!(run(&input, 1).await.unwrap(), input);
    }

    #[tokio::test]
    async fn after_a_rewrite_violations_and_oversize_blocks_end_the_connection() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let block = encode(&mut enc, &request("a%2Fb", "/x"));
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let mut bad_index = input.clone();
        bad_index.extend(frame(HEADERS, END_HEADERS, 3, &[0xff, 0xff, 0xff, 0xff]));
        assert!(run(&bad_index, 4096).await.is_err());
        let mut interleaved = input.clone();
        interleaved.extend(frame(HEADERS, 0, 3, &block[..1]));
        interleaved.extend(frame(0x0, 0, 3, b"x"));
        assert!(run(&interleaved, 4096).await.is_err());
        let mut huge = input.clone();
        for i in 0..(MAX_HEADER_BLOCK / MAX_FRAME_PAYLOAD + 1) {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            huge.extend(frame(kind, 0, 5, &[0x82; MAX_FRAME_PAYLOAD]));
        }
        let err = run(&huge, 1 << 20).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn expanding_block_is_bounded() {
        // One 3 KB table entry referred to by 1-byte indexes: the decoded list would be
        // thousands of times the encoded block.
        let mut b1 = Vec::new();
        lit_indexed(&mut b1, ":authority", "a%2Fb");
        lit_indexed(&mut b1, "x-big", &"b".repeat(3_000));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0xbe; 1000]));
        let err = run(&input, 4096).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // The same block is fine when it stays under the bound.
        let mut small = PREFACE.to_vec();
        small.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        small.extend(frame(HEADERS, END_HEADERS, 3, &[0xbe; 10]));
        let (_, blocks) = h2_view(&run(&small, 4096).await.unwrap());
        assert_eq!(blocks[1].len(), 10);
    }

    #[test]
    fn integers_follow_rfc_7541_examples() {
        let mut out = BytesMut::new();
        encode_int(&mut out, 0, 5, 10);
        encode_int(&mut out, 0, 5, 1337);
        encode_int(&mut out, 0, 8, 42);
        assert_eq!(&out[..], &[10, 31, 154, 10, 42]);
    }
}
