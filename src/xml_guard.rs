//! A size and depth limit on the XML coming from the server, enforced on the
//! bytes before tokio-xmpp parses them.
//!
//! Written by hand because tokio-xmpp 6 builds its parser with
//! `rxml::Parser::default()`, which has no stanza size or nesting limit: a
//! 50 MB stanza of small elements costs ~800 MB of memory, and a ~70 kB
//! stanza nested a few thousand levels deep overflows a worker's stack in
//! xso's element builder and aborts the process. This scanner only tracks
//! where tags open and close (quotes, comments, CDATA and processing
//! instructions included), so it is cheap; past a limit the read fails with
//! `InvalidData`, the stream is dropped and the session reconnects, with the
//! reason in the logs and `onsip_xmpp_errors_total{kind="stream"}`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The limits, in bytes and levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest `<message>`/`<presence>` (anyone can send us those).
    pub max_stanza_bytes: usize,
    /// Largest `<iq>` (replies to our own requests: an items retrieval of a
    /// large fleet is big).
    pub max_iq_bytes: usize,
    /// Deepest nesting inside a stanza.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stanza_bytes: 2 << 20,
            max_iq_bytes: 64 << 20,
            max_depth: 64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Character data.
    Text,
    /// Just read `<`.
    Open,
    /// Inside a start tag; `slash` remembers a `/` just before `>`.
    StartTag { slash: bool },
    /// Inside a quoted attribute value.
    Quoted { quote: u8 },
    /// Inside an end tag.
    EndTag,
    /// `<?...?>`, `<!--...-->`, `<![CDATA[...]]>` or `<!...>`: skipped
    /// until `end` is seen; `matched` counts its bytes matched so far.
    Skip { end: &'static [u8], matched: usize },
    /// Just read `<!`: comment, CDATA or declaration follows.
    Bang { seen: usize },
}

/// The scanner's state between reads.
#[derive(Debug)]
pub struct Scanner {
    limits: Limits,
    state: State,
    /// Element depth: 1 inside `<stream:stream>`, 2 inside a stanza.
    depth: usize,
    /// Bytes of the current top-level stanza so far.
    stanza_bytes: usize,
    /// The limit that applies to the current stanza.
    stanza_limit: usize,
    /// First bytes of the current start tag's name.
    name: [u8; 16],
    name_len: usize,
    in_name: bool,
    /// The current top-level stanza's name, for the error message.
    stanza_name: [u8; 16],
    stanza_name_len: usize,
}

impl Scanner {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::Text,
            depth: 0,
            stanza_bytes: 0,
            stanza_limit: limits.max_stanza_bytes,
            name: [0; 16],
            name_len: 0,
            in_name: false,
            stanza_name: [0; 16],
            stanza_name_len: 0,
        }
    }

    fn name(&self) -> &[u8] {
        &self.name[..self.name_len]
    }

    /// The start tag just closed with `>` (not self-closing).
    fn opened(&mut self) -> Result<(), String> {
        let name = self.name();
        // A stream (re)start: `<stream:stream>` after STARTTLS or SASL
        // replaces the old stream without closing it.
        if name.ends_with(b"stream") && (name == b"stream" || name.ends_with(b":stream")) {
            self.depth = 1;
            return Ok(());
        }
        self.depth += 1;
        if self.depth > self.limits.max_depth + 1 {
            return Err(format!(
                "XML nested deeper than {} levels",
                self.limits.max_depth
            ));
        }
        Ok(())
    }

    /// Scans `bytes`; an error says which limit was passed.
    pub fn scan(&mut self, bytes: &[u8]) -> Result<(), String> {
        for &b in bytes {
            // Count the bytes of a top-level stanza: from its `<` (read at
            // depth 1) until the depth is back to 1.
            let in_stanza = self.depth >= 2 || (self.depth == 1 && self.state != State::Text);
            if in_stanza {
                self.stanza_bytes += 1;
                if self.stanza_bytes > self.stanza_limit {
                    return Err(format!(
                        "stanza <{}> larger than {} bytes",
                        String::from_utf8_lossy(&self.stanza_name[..self.stanza_name_len]),
                        self.stanza_limit
                    ));
                }
            }
            self.state = match self.state {
                State::Text => {
                    if b == b'<' {
                        State::Open
                    } else {
                        State::Text
                    }
                }
                State::Open => match b {
                    b'/' => State::EndTag,
                    b'?' => State::Skip {
                        end: b"?>",
                        matched: 0,
                    },
                    b'!' => State::Bang { seen: 0 },
                    _ => {
                        if self.depth <= 1 {
                            self.stanza_bytes = 2;
                        }
                        self.name_len = 0;
                        self.in_name = true;
                        self.push_name(b);
                        State::StartTag { slash: false }
                    }
                },
                State::StartTag { slash } => match b {
                    b'"' | b'\'' => {
                        self.in_name = false;
                        State::Quoted { quote: b }
                    }
                    b'>' => {
                        self.in_name = false;
                        if self.depth == 1 {
                            self.stanza_name = self.name;
                            self.stanza_name_len = self.name_len;
                            self.stanza_limit = if self.name() == b"iq" {
                                self.limits.max_iq_bytes
                            } else {
                                self.limits.max_stanza_bytes
                            };
                        }
                        if !slash {
                            self.opened()?;
                        } else if self.depth <= 1 {
                            self.stanza_bytes = 0;
                        }
                        State::Text
                    }
                    b'/' => {
                        self.in_name = false;
                        State::StartTag { slash: true }
                    }
                    _ => {
                        if b.is_ascii_whitespace() {
                            self.in_name = false;
                        } else if self.in_name {
                            self.push_name(b);
                        }
                        State::StartTag { slash: false }
                    }
                },
                State::Quoted { quote } => {
                    if b == quote {
                        State::StartTag { slash: false }
                    } else {
                        State::Quoted { quote }
                    }
                }
                State::EndTag => {
                    if b == b'>' {
                        self.depth = self.depth.saturating_sub(1);
                        if self.depth <= 1 {
                            self.stanza_bytes = 0;
                        }
                        State::Text
                    } else {
                        State::EndTag
                    }
                }
                State::Bang { seen } => match (seen, b) {
                    (0, b'-') => State::Bang { seen: 1 },
                    (1, b'-') => State::Skip {
                        end: b"-->",
                        matched: 0,
                    },
                    (0, b'[') => State::Skip {
                        end: b"]]>",
                        matched: 0,
                    },
                    _ => State::Skip {
                        end: b">",
                        matched: 0,
                    },
                },
                State::Skip { end, matched } => {
                    let matched = if b == end[matched] {
                        matched + 1
                    } else if b == end[0] {
                        1
                    } else {
                        0
                    };
                    if matched == end.len() {
                        if self.depth <= 1 {
                            self.stanza_bytes = 0;
                        }
                        State::Text
                    } else {
                        State::Skip { end, matched }
                    }
                }
            };
        }
        Ok(())
    }

    fn push_name(&mut self, b: u8) {
        if self.name_len < self.name.len() {
            self.name[self.name_len] = b;
            self.name_len += 1;
        }
    }
}

/// Wraps a transport and checks what is read from it.
pub struct Guarded<T> {
    inner: T,
    scanner: Scanner,
    failed: Option<String>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, limits: Limits) -> Self {
        Self {
            inner,
            scanner: Scanner::new(limits),
            failed: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(reason) = &self.failed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                reason.clone(),
            )));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Err(reason) = this.scanner.scan(&buf.filled()[before..]) {
                    // Hand nothing of the offending read to the parser.
                    buf.set_filled(before);
                    this.failed = Some(reason.clone());
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_stanza_bytes: 200,
        max_iq_bytes: 400,
        max_depth: 8,
    };

    fn scan(parts: &[&str]) -> Result<(), String> {
        let mut scanner = Scanner::new(LIMITS);
        for part in parts {
            scanner.scan(part.as_bytes())?;
        }
        Ok(())
    }

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='x' version='1.0'>";

    #[test]
    fn normal_traffic_and_stream_restarts_pass() {
        let stanza = "<message from='a' to='b'><event xmlns='e'><items node='/d/u'><item id='1'><user-agent xmlns='onsip:user-agents'><device>A</device><!-- <x> --></user-agent></item></items></event></message>";
        assert!(stanza.len() < 200);
        // A stream restart (after STARTTLS or SASL), then many stanzas each
        // under the limit but far over it together, split across reads.
        let mut all = format!("{HEADER}<stream:features/>{HEADER}");
        for _ in 0..100 {
            all.push_str("<presence/> \n");
            all.push_str(stanza);
        }
        assert_eq!(scan(&[&all[..]]), Ok(()));
        let chunks: Vec<&str> = all
            .as_bytes()
            .chunks(7)
            .map(|c| std::str::from_utf8(c).expect("ASCII"))
            .collect();
        assert_eq!(scan(&chunks), Ok(()));
    }

    #[test]
    fn a_big_message_is_refused_but_a_big_iq_is_not() {
        let body = "x".repeat(250);
        let message = format!("{HEADER}<message><body>{body}</body></message>");
        let err = scan(&[&message]).expect_err("too big");
        assert_eq!(err, "stanza <message> larger than 200 bytes");
        let iq = format!("{HEADER}<iq type='result' id='1'><pubsub xmlns='p'>{body}</pubsub></iq>");
        assert_eq!(scan(&[&iq]), Ok(()));
        let huge_iq = format!("{HEADER}<iq>{}</iq>", "y".repeat(500));
        assert!(scan(&[&huge_iq]).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{HEADER}<message>{}", "<a>".repeat(20));
        assert_eq!(
            scan(&[&deep]),
            Err("XML nested deeper than 8 levels".to_owned())
        );
        let ok = format!("{HEADER}<message><a><b><c/></b></a></message>");
        assert_eq!(scan(&[&ok]), Ok(()));
    }

    #[test]
    fn quotes_and_comments_hide_angle_brackets() {
        let tricky = format!(
            "{HEADER}<message a='>' b=\"<x>\"><!-- </message> --><body/></message><presence/>"
        );
        let mut scanner = Scanner::new(LIMITS);
        assert_eq!(scanner.scan(tricky.as_bytes()), Ok(()));
        assert_eq!(scanner.depth, 1);
    }
}
