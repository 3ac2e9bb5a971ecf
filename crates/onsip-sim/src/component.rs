//! The XEP-0114 face: attach both services to a real XMPP server (Prosody)
//! as external components, one TCP link per service JID, and keep each link
//! up (reconnecting with back-off) until cancelled.
//!
//! Hand-written on purpose: tokio-xmpp's component support needs its
//! `component` feature, which flips xmpp-parsers' default namespace for the
//! whole workspace build, and its stream-header reader insists on a
//! `version` attribute that Prosody's component streams do not send. So this
//! face reads the stream with rxml into `minidom::Element`s and writes plain
//! serialised elements in `jabber:component:accept`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use minidom::Element;
use rxml::{AsyncReader, Event, Namespace};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncBufRead, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use xso::minidom_compat::ElementFromEvents;
use xso::FromEventsBuilder;

use crate::sim::Simulator;
use crate::xml::{self, NS_CLIENT, NS_COMPONENT, NS_STREAM};
use crate::SimError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(60);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Stanzas written per flush, so one busy link cannot starve reading.
const WRITE_BATCH: usize = 256;

/// Attach both services (auth and pubsub JIDs of the simulator's config) to
/// the server's component port at `addr`, authenticating with `secret`
/// (both components must be declared with it). Runs until `cancel` fires,
/// reconnecting whenever a link drops or fails; see
/// [`Simulator::component_status`] and [`Simulator::components_connected`].
pub async fn attach_component(
    sim: Simulator,
    addr: SocketAddr,
    secret: String,
    cancel: CancellationToken,
) -> Result<(), SimError> {
    let cfg = sim.config();
    let jids = [cfg.auth_jid.clone(), cfg.pubsub_jid.clone()];
    for j in &jids {
        if j.is_empty() || xml::bare_jid(j).as_deref() != Some(j.as_str()) {
            return Err(SimError::Config(format!("bad component JID {j:?}")));
        }
    }
    let links = jids
        .into_iter()
        .map(|jid| run_link(sim.clone(), addr, jid, secret.clone(), cancel.clone()));
    futures::future::join_all(links).await;
    Ok(())
}

enum LinkEnd {
    Cancelled,
    Dropped,
    ClosedByPeer,
}

async fn run_link(
    sim: Simulator,
    addr: SocketAddr,
    jid: String,
    secret: String,
    cancel: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    let mut drop_rx = sim.drop_signal();
    loop {
        // Drops requested while we were disconnected are moot.
        drop_rx.borrow_and_update();
        let mut was_up = false;
        let end = link_once(
            &sim,
            addr,
            &jid,
            &secret,
            &cancel,
            &mut drop_rx,
            &mut was_up,
        )
        .await;
        if was_up {
            backoff = MIN_BACKOFF;
        }
        match end {
            Ok(LinkEnd::Cancelled) => return,
            Ok(LinkEnd::Dropped) => tracing::info!(%jid, "component link dropped on request"),
            Ok(LinkEnd::ClosedByPeer) => {
                tracing::warn!(%jid, "component link closed by server");
                sim.component_failed(&jid, "closed by server".into());
            }
            Err(e) => {
                tracing::warn!(%jid, cause = %e, "component link failed");
                sim.component_failed(&jid, e.to_string());
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The XEP-0114 handshake digest: lower-case hex `sha1(stream_id + secret)`.
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let mut h = Sha1::new();
    h.update(stream_id.as_bytes());
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn timed<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timed out {what}"),
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn link_once(
    sim: &Simulator,
    addr: SocketAddr,
    jid: &str,
    secret: &str,
    cancel: &CancellationToken,
    drop_rx: &mut tokio::sync::watch::Receiver<u64>,
    was_up: &mut bool,
) -> io::Result<LinkEnd> {
    let tcp = tokio::select! {
        _ = cancel.cancelled() => return Ok(LinkEnd::Cancelled),
        r = timed(CONNECT_TIMEOUT, "connecting", TcpStream::connect(addr)) => r?,
    };
    tcp.set_nodelay(true)?;
    let (rd, wr) = tcp.into_split();
    let mut reader = StreamReader::new(BufReader::new(rd));
    let mut wr = BufWriter::new(wr);

    let handshake = async {
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT}' xmlns:stream='{NS_STREAM}' to='{}'>",
            escape_attr(jid)
        );
        wr.write_all(header.as_bytes()).await?;
        wr.flush().await?;
        let stream_id = match reader.next().await? {
            Frame::Header { id: Some(id), .. } => id,
            Frame::Header { id: None, .. } => return Err(protocol("server sent no stream id")),
            Frame::Element(e) => return Err(protocol(describe_unexpected(&e))),
            Frame::End => return Err(protocol("server closed the stream before its header")),
        };
        let digest = handshake_digest(&stream_id, secret);
        wr.write_all(format!("<handshake>{digest}</handshake>").as_bytes())
            .await?;
        wr.flush().await?;
        match reader.next().await? {
            Frame::Element(e) if e.name() == "handshake" => Ok(()),
            Frame::Element(e) => Err(protocol(describe_unexpected(&e))),
            Frame::Header { .. } => Err(protocol("second stream header")),
            Frame::End => Err(protocol("server closed the stream during the handshake")),
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => return Ok(LinkEnd::Cancelled),
        r = timed(HANDSHAKE_TIMEOUT, "in the component handshake", handshake) => r?,
    }

    let (link_id, mut rx) = sim.component_up(jid);
    *was_up = true;
    tracing::info!(%jid, %addr, "component link up");
    let end = serve(sim, jid, &mut reader, &mut wr, &mut rx, cancel, drop_rx).await;
    sim.component_down(jid, link_id, end.as_ref().err().map(|e| e.to_string()));
    // Whatever was still queued for this link is lost with it.
    rx.close();
    let mut lost = 0;
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    sim.dequeued(lost);
    end
}

async fn serve<R: AsyncBufRead + Unpin, W: tokio::io::AsyncWrite + Unpin>(
    sim: &Simulator,
    jid: &str,
    reader: &mut StreamReader<R>,
    wr: &mut BufWriter<W>,
    rx: &mut mpsc::UnboundedReceiver<Element>,
    cancel: &CancellationToken,
    drop_rx: &mut tokio::sync::watch::Receiver<u64>,
) -> io::Result<LinkEnd> {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.reset();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = wr.write_all(b"</stream:stream>").await;
                let _ = wr.flush().await;
                return Ok(LinkEnd::Cancelled);
            }
            changed = drop_rx.changed() => {
                if changed.is_ok() {
                    let _ = wr.write_all(b"</stream:stream>").await;
                    let _ = wr.flush().await;
                    return Ok(LinkEnd::Dropped);
                }
            }
            Some(first) = rx.recv() => {
                let mut n = 0;
                let mut next = Some(first);
                while let Some(el) = next.take() {
                    let el = xml::rewrite_ns(&el, NS_CLIENT, NS_COMPONENT);
                    let res = wr.write_all(&xml::to_bytes(&el)).await;
                    sim.dequeued(1);
                    res?;
                    n += 1;
                    if n < WRITE_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                wr.flush().await?;
                keepalive.reset();
            }
            frame = reader.next() => match frame? {
                Frame::Element(el) if el.is("error", NS_STREAM) => {
                    return Err(protocol(describe_unexpected(&el)));
                }
                Frame::Element(el) => {
                    tracing::trace!(%jid, name = el.name(), "stanza from server");
                    sim.handle_stanza(&el);
                }
                Frame::End => return Ok(LinkEnd::ClosedByPeer),
                Frame::Header { .. } => return Err(protocol("unexpected second stream header")),
            },
            _ = keepalive.tick() => {
                // Whitespace keepalive: lets a dead TCP peer surface as a write error.
                wr.write_all(b" ").await?;
                wr.flush().await?;
            }
        }
    }
}

fn describe_unexpected(e: &Element) -> String {
    if e.is("error", NS_STREAM) {
        let cond = e
            .children()
            .find(|c| c.ns() == "urn:ietf:params:xml:ns:xmpp-streams" && c.name() != "text")
            .map(|c| c.name().to_owned())
            .unwrap_or_else(|| "undefined-condition".into());
        let text = e
            .children()
            .find(|c| c.name() == "text")
            .map(|t| format!(" ({})", t.text()))
            .unwrap_or_default();
        format!("stream error: {cond}{text}")
    } else {
        format!("unexpected <{} xmlns='{}'/>", e.name(), e.ns())
    }
}

/// What the stream reader produced.
pub(crate) enum Frame {
    /// The peer's stream header, with its `id` and `to`.
    Header {
        id: Option<String>,
        #[cfg_attr(not(test), allow(dead_code))]
        to: Option<String>,
    },
    /// A complete top-level element.
    Element(Element),
    /// Stream footer or EOF.
    End,
}

/// Incremental XML stream reader: stream header, then one
/// `minidom::Element` per top-level child. Cancel-safe: all partial state
/// lives in `self`, so it can sit in a `select!`.
pub(crate) struct StreamReader<R> {
    reader: AsyncReader<R>,
    started: bool,
    builder: Option<ElementFromEvents>,
}

impl<R: AsyncBufRead + Unpin> StreamReader<R> {
    pub(crate) fn new(r: R) -> Self {
        StreamReader {
            reader: AsyncReader::new(r),
            started: false,
            builder: None,
        }
    }

    pub(crate) async fn next(&mut self) -> io::Result<Frame> {
        let ctx = xso::Context::empty();
        loop {
            let Some(ev) = self.reader.read().await? else {
                return Ok(Frame::End);
            };
            if let Some(b) = self.builder.as_mut() {
                match b.feed(ev, &ctx) {
                    Ok(Some(el)) => {
                        self.builder = None;
                        return Ok(Frame::Element(el));
                    }
                    Ok(None) => continue,
                    Err(e) => return Err(protocol(format!("bad element: {e}"))),
                }
            }
            match ev {
                Event::XmlDeclaration(..) | Event::Text(..) => {}
                Event::StartElement(_, qname, attrs) => {
                    if !self.started {
                        if qname.0 != NS_STREAM || qname.1 != "stream" {
                            return Err(protocol("not an XMPP stream"));
                        }
                        self.started = true;
                        let id = attrs.get(&Namespace::NONE, "id").cloned();
                        let to = attrs.get(&Namespace::NONE, "to").cloned();
                        return Ok(Frame::Header { id, to });
                    }
                    self.builder = Some(ElementFromEvents::new(qname, attrs));
                }
                Event::EndElement(_) => return Ok(Frame::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_lowercase_hex_sha1_of_id_and_secret() {
        // `printf 3BF96D32secret | sha1sum`
        assert_eq!(
            handshake_digest("3BF96D32", "secret"),
            "b09ea9b3b7f586be8a08d0a3dd7466f110aeb136"
        );
    }

    #[tokio::test]
    async fn reader_yields_header_elements_and_end() {
        let data = b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='pubsub.example.com'> <handshake/><iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>";
        let mut r = StreamReader::new(&data[..]);
        assert!(
            matches!(r.next().await.expect("header"), Frame::Header { id: Some(ref i), .. } if i == "abc")
        );
        assert!(
            matches!(r.next().await.expect("hs"), Frame::Element(ref e) if e.is("handshake", NS_COMPONENT))
        );
        match r.next().await.expect("iq") {
            Frame::Element(e) => {
                assert!(e.is("iq", NS_COMPONENT));
                assert!(e.has_child("ping", "urn:xmpp:ping"));
            }
            _ => panic!("expected iq"),
        }
        assert!(matches!(r.next().await.expect("end"), Frame::End));
    }

    use crate::config::{Account, SimConfig};
    use tokio::io::AsyncWriteExt;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::TcpListener;

    const SECRET: &str = "s3cret";
    const WAIT: Duration = Duration::from_secs(10);

    /// One accepted link as a Prosody-like server sees it.
    struct Peer {
        to: String,
        reader: StreamReader<BufReader<OwnedReadHalf>>,
        wr: OwnedWriteHalf,
    }

    impl Peer {
        async fn element(&mut self) -> Element {
            match tokio::time::timeout(WAIT, self.reader.next()).await {
                Ok(Ok(Frame::Element(e))) => e,
                _ => panic!("expected an element on the {} link", self.to),
            }
        }

        async fn send(&mut self, xml: &str) {
            self.wr.write_all(xml.as_bytes()).await.expect("write");
        }
    }

    /// Accept one component connection and run the XEP-0114 handshake the
    /// way Prosody 0.12 does (its stream header has no `version`). Returns
    /// `None` after rejecting a wrong digest with a stream error.
    async fn accept(listener: &TcpListener, secret: &str) -> Option<Peer> {
        let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("connect")
            .expect("accept");
        let (rd, mut wr) = tcp.into_split();
        let mut reader = StreamReader::new(BufReader::new(rd));
        let to = match reader.next().await.expect("header") {
            Frame::Header { to: Some(to), .. } => to,
            _ => panic!("no stream header with to"),
        };
        let id = format!("id-{to}");
        wr.write_all(
            format!("<?xml version='1.0'?><stream:stream xmlns:stream='{NS_STREAM}' xml:lang='en' xmlns='{NS_COMPONENT}' id='{id}' from='{to}'>")
                .as_bytes(),
        )
        .await
        .expect("header");
        let hs = match reader.next().await.expect("handshake") {
            Frame::Element(e) if e.is("handshake", NS_COMPONENT) => e.text(),
            _ => panic!("expected a handshake"),
        };
        if hs != handshake_digest(&id, secret) {
            let _ = wr
                .write_all(b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>")
                .await;
            return None;
        }
        wr.write_all(b"<handshake/>")
            .await
            .expect("handshake reply");
        Some(Peer { to, reader, wr })
    }

    fn config() -> SimConfig {
        SimConfig::new("example.com").with_account(Account::new(
            "u@example.com",
            &["u@acme.example"],
            "pw",
        ))
    }

    async fn accept_both(listener: &TcpListener) -> (Peer, Peer) {
        let a = accept(listener, SECRET).await.expect("handshake ok");
        let b = accept(listener, SECRET).await.expect("handshake ok");
        if a.to.starts_with("pubsub.") {
            (b, a)
        } else {
            (a, b)
        }
    }

    #[tokio::test]
    async fn links_handshake_serve_and_reconnect_after_drop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sim = Simulator::new(config());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(attach_component(
            sim.clone(),
            addr,
            SECRET.into(),
            cancel.clone(),
        ));

        let (mut auth, mut pubsub) = accept_both(&listener).await;
        assert_eq!(auth.to, "commands.auth.example.com");
        assert_eq!(pubsub.to, "pubsub.user-agents.example.com");
        assert!(sim.wait_until(WAIT, |s| s.components_connected()).await);

        // A client's ping, routed by the server with the client's full JID.
        pubsub
            .send("<iq type='get' id='p1' from='u@example.com/r' to='pubsub.user-agents.example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
            .await;
        let pong = pubsub.element().await;
        assert!(pong.is("iq", NS_COMPONENT), "{pong:?}");
        assert_eq!(pong.attr("type"), Some("result"));
        assert_eq!(pong.attr("id"), Some("p1"));
        assert_eq!(pong.attr("to"), Some("u@example.com/r"));
        assert_eq!(pong.attr("from"), Some("pubsub.user-agents.example.com"));

        // Authorize over the auth link, subscribe over the pubsub link.
        auth.send(
            "<iq type='set' id='a1' from='u@example.com/r' to='commands.auth.example.com'>\
             <command xmlns='http://jabber.org/protocol/commands' node='authorize-plain'>\
             <x xmlns='jabber:x:data' type='submit'><field var='sip-address'><value>u@acme.example</value></field>\
             <field var='password'><value>pw</value></field></x></command></iq>",
        )
        .await;
        let done = auth.element().await;
        assert_eq!(done.attr("type"), Some("result"));
        assert!(done.has_child("command", crate::xml::NS_COMMANDS));
        pubsub
            .send(
                "<iq type='set' id='s1' from='u@example.com/r' to='pubsub.user-agents.example.com'>\
                 <pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='/acme.example/u' jid='u@example.com/r'/></pubsub></iq>",
            )
            .await;
        assert_eq!(pubsub.element().await.attr("type"), Some("result"));
        let notice = pubsub.element().await;
        assert!(notice.is("message", NS_COMPONENT));
        assert_eq!(notice.attr("to"), Some("u@example.com"));

        sim.register_phone(
            "u@acme.example",
            "i1",
            "sip:u@10.0.0.1",
            "sip:203.0.113.1:5060",
            "Yealink SIP-T54W 96.86.0.70",
            chrono::Utc::now() + chrono::Duration::minutes(5),
        );
        let ev = pubsub.element().await;
        assert!(ev.is("message", NS_COMPONENT));
        assert!(ev.has_child("event", crate::xml::NS_PUBSUB_EVENT));
        assert_eq!(sim.queued(), 0);

        // drop_links: both links close, then come back on their own.
        sim.drop_links();
        for p in [&mut auth, &mut pubsub] {
            let end = tokio::time::timeout(WAIT, p.reader.next())
                .await
                .expect("link closes");
            assert!(matches!(end, Ok(Frame::End) | Err(_)));
        }
        let (_auth2, _pubsub2) = accept_both(&listener).await;
        assert!(
            sim.wait_until(WAIT, |s| s.stats().component_connects == 4
                && s.components_connected())
                .await
        );

        cancel.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stops")
            .expect("joins")
            .expect("ok");
        assert!(!sim.components_connected());
    }

    #[tokio::test]
    async fn wrong_secret_is_reported_and_retried() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let sim = Simulator::new(config());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(attach_component(
            sim.clone(),
            addr,
            "wrong".into(),
            cancel.clone(),
        ));
        assert!(accept(&listener, SECRET).await.is_none());
        assert!(accept(&listener, SECRET).await.is_none());
        assert!(
            sim.wait_until(WAIT, |s| s.component_status().iter().any(|c| c
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("not-authorized"))))
                .await,
            "{:?}",
            sim.component_status()
        );
        // It retries.
        assert!(accept(&listener, SECRET).await.is_none());
        assert!(!sim.components_connected());
        cancel.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stops")
            .expect("joins")
            .expect("ok");
    }
}
