//! A small in-process XMPP server (c2s) for the demo and tests, where no
//! Prosody is available: plaintext TCP on loopback, SASL PLAIN against the
//! accounts' XMPP passwords, resource binding, presence with priority, and
//! routing between the connected clients and the simulated services.
//!
//! It behaves like a real server where the exporter can notice: stanzas to
//! a bare JID reach only resources with available presence and priority
//! ≥ 0; pings are answered; unknown requests get `service-unavailable`; the
//! server stamps `from` on everything a client sends. Stream negotiation
//! uses tokio-xmpp's public `xmlstream` responder API.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::io;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use minidom::Element;
use rxml::{xml_ncname, Namespace};
use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_xmpp::xmlstream::{accept_stream, ReadError, StreamHeader, Timeouts, XmlStream};
use xmpp_parsers::bind::BindFeature;
use xmpp_parsers::stream_error::{DefinedCondition, StreamError};
use xmpp_parsers::stream_features::StreamFeatures;

use crate::sim::{Outbound, Simulator};
use crate::xml::{
    self, El, ErrorType, StanzaError, NS_BIND, NS_CLIENT, NS_DISCO_INFO, NS_PING, NS_ROSTER,
    NS_SASL, NS_SESSION,
};
use crate::SimError;

type Stream = XmlStream<BufStream<TcpStream>, Element>;

const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_SASL_ATTEMPTS: usize = 3;
/// Like a real server, tolerate long client silence: an idle exporter only
/// speaks when it re-authorizes, and tokio-xmpp clients do not answer
/// pings. After `read_timeout` of silence the server pings the client;
/// only after a further `response_timeout` is the session dropped.
const SESSION_TIMEOUTS: Timeouts = Timeouts {
    read_timeout: Duration::from_secs(3600),
    response_timeout: Duration::from_secs(3600),
};

/// Serve XMPP clients on `listener` until `cancel` fires, then close every
/// session and return. Per-connection failures are logged, never fatal.
pub async fn serve_c2s(
    sim: Simulator,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), SimError> {
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, domain = %sim.config().xmpp_domain, "c2s endpoint listening");
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let sim = sim.clone();
                    let cancel = cancel.child_token();
                    tracker.spawn(async move {
                        if let Err(e) = session(sim, tcp, cancel).await {
                            tracing::debug!(%peer, cause = %e, "c2s session ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: pause instead of spinning.
                    tracing::warn!(cause = %e, "c2s accept failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Domains the endpoint accepts logins for: the XMPP domain and every
/// account's domain.
fn served_domains(sim: &Simulator) -> HashSet<String> {
    let cfg = sim.config();
    let mut d: HashSet<String> = cfg
        .accounts
        .iter()
        .filter_map(|a| xml::jid_domain(&a.jid))
        .collect();
    d.insert(cfg.xmpp_domain.clone());
    d
}

fn stream_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn session(sim: Simulator, tcp: TcpStream, cancel: CancellationToken) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut drop_rx = sim.drop_signal();
    drop_rx.borrow_and_update();
    let negotiated = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        _ = drop_rx.changed() => return Ok(()),
        r = tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&sim, tcp)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "stream negotiation timed out")),
        },
    };
    let Some((mut stream, bare, resource_req)) = negotiated else {
        return Ok(());
    };
    let (full, link_id, mut rx) = sim.session_up(&bare, &resource_req.resource);
    let bind_reply = El::new("iq", NS_CLIENT)
        .attr(xml_ncname!("type"), "result")
        .attr(xml_ncname!("id"), resource_req.iq_id.clone())
        .child(El::new("bind", NS_BIND).child(El::new("jid", NS_BIND).text(full.clone())))
        .build();
    tracing::debug!(jid = %full, "c2s session bound");
    let result = match stream.send(&bind_reply).await {
        Ok(()) => {
            run(
                &sim,
                &mut stream,
                &full,
                &bare,
                &mut rx,
                &cancel,
                &mut drop_rx,
            )
            .await
        }
        Err(e) => Err(e),
    };
    sim.session_down(&full, link_id);
    rx.close();
    let mut lost = 0;
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    sim.dequeued(lost);
    // Best effort: the peer may be gone already.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    tracing::debug!(jid = %full, "c2s session closed");
    result
}

struct BindRequest {
    iq_id: String,
    resource: String,
}

/// Stream header, SASL PLAIN, stream restart, bind request. `None`: the
/// client failed to authenticate or went away (already answered).
async fn negotiate(
    sim: &Simulator,
    tcp: TcpStream,
) -> io::Result<Option<(Stream, String, BindRequest)>> {
    let timeouts = SESSION_TIMEOUTS;
    let domains = served_domains(sim);
    let mut accepted = accept_stream(BufStream::new(tcp), NS_CLIENT, timeouts).await?;
    let to = accepted
        .take_header()
        .to
        .map(Cow::into_owned)
        .unwrap_or_default()
        .to_lowercase();
    let header = |domain: &str| StreamHeader {
        from: Some(Cow::Owned(domain.to_owned())),
        to: None,
        id: Some(Cow::Owned(stream_id())),
    };
    let pending = accepted.send_header(header(&to)).await?;
    if !domains.contains(&to) {
        let err = StreamError {
            condition: DefinedCondition::HostUnknown,
            texts: Default::default(),
            application_specific: Vec::new(),
        };
        pending.send_error(&err).await?;
        return Ok(None);
    }
    let features = StreamFeatures {
        sasl_mechanisms: BTreeSet::from(["PLAIN".to_owned()]),
        ..StreamFeatures::default()
    };
    let mut stream: Stream = pending.send_features(&features).await?;

    let mut bare = None;
    for _ in 0..MAX_SASL_ATTEMPTS {
        match sasl_plain(sim, &mut stream, &to).await? {
            SaslResult::Ok(b) => {
                bare = Some(b);
                break;
            }
            SaslResult::Failed => {
                sim.c2s_auth_failed();
                let failure = El::new("failure", NS_SASL)
                    .child(El::new("not-authorized", NS_SASL))
                    .build();
                stream.send(&failure).await?;
            }
            SaslResult::Gone => return Ok(None),
        }
    }
    let Some(bare) = bare else {
        let _ = stream.shutdown().await;
        return Ok(None);
    };

    let success = El::new("success", NS_SASL).build();
    let mut accepted = stream.accept_reset(&success).await?;
    let _ = accepted.take_header();
    let pending = accepted.send_header(header(&to)).await?;
    let features = StreamFeatures {
        bind: Some(BindFeature { required: false }),
        ..StreamFeatures::default()
    };
    let mut stream: Stream = pending.send_features(&features).await?;

    loop {
        let Some(el) = read(&mut stream).await? else {
            return Ok(None);
        };
        if xml::is_stanza(&el, "iq") && el.attr("type") == Some("set") {
            if let Some(b) = el.get_child("bind", NS_BIND) {
                let resource = b
                    .get_child("resource", NS_BIND)
                    .map(|r| r.text().trim().to_owned())
                    .filter(|r| !r.is_empty() && jid::Jid::new(&format!("{bare}/{r}")).is_ok())
                    .unwrap_or_else(|| format!("sim-{}", stream_id()));
                let iq_id = el.attr("id").unwrap_or_default().to_owned();
                return Ok(Some((stream, bare, BindRequest { iq_id, resource })));
            }
        }
        // Anything before binding is refused (RFC 6120 §7.1).
        if xml::is_stanza(&el, "iq") && matches!(el.attr("type"), Some("get") | Some("set")) {
            let err = StanzaError::new(ErrorType::Auth, "not-authorized");
            stream.send(&xml::iq_error(&el, &to, &err)).await?;
        }
    }
}

enum SaslResult {
    Ok(String),
    Failed,
    Gone,
}

/// One SASL PLAIN exchange (with or without an initial response).
async fn sasl_plain(sim: &Simulator, stream: &mut Stream, domain: &str) -> io::Result<SaslResult> {
    let Some(el) = read(stream).await? else {
        return Ok(SaslResult::Gone);
    };
    if el.is("abort", NS_SASL) {
        return Ok(SaslResult::Failed);
    }
    if !el.is("auth", NS_SASL) || el.attr("mechanism") != Some("PLAIN") {
        let failure = El::new("failure", NS_SASL)
            .child(El::new("invalid-mechanism", NS_SASL))
            .build();
        stream.send(&failure).await?;
        return Ok(SaslResult::Failed);
    }
    let mut data = el.text().trim().to_owned();
    if data.is_empty() || data == "=" {
        // No initial response: ask for it with an empty challenge.
        stream.send(&El::new("challenge", NS_SASL).build()).await?;
        let Some(resp) = read(stream).await? else {
            return Ok(SaslResult::Gone);
        };
        if !resp.is("response", NS_SASL) {
            return Ok(SaslResult::Failed);
        }
        data = resp.text().trim().to_owned();
    }
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(data.as_bytes()) else {
        return Ok(SaslResult::Failed);
    };
    // authzid NUL authcid NUL password
    let mut parts = raw.split(|b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ok(SaslResult::Failed);
    };
    let (Ok(authcid), Ok(password)) = (std::str::from_utf8(authcid), std::str::from_utf8(password))
    else {
        return Ok(SaslResult::Failed);
    };
    let bare = format!("{authcid}@{domain}").to_lowercase();
    let ok = sim
        .config()
        .accounts
        .iter()
        .any(|a| a.jid.to_lowercase() == bare && a.xmpp_password == password);
    Ok(if ok {
        SaslResult::Ok(bare)
    } else {
        SaslResult::Failed
    })
}

/// Next element, skipping soft timeouts; `None` on stream end.
async fn read(stream: &mut Stream) -> io::Result<Option<Element>> {
    loop {
        match stream.next().await {
            None | Some(Err(ReadError::StreamFooterReceived)) => return Ok(None),
            Some(Ok(el)) => return Ok(Some(el)),
            Some(Err(ReadError::SoftTimeout)) => {}
            Some(Err(ReadError::HardError(e))) => return Err(e),
            Some(Err(ReadError::ParseError(e))) => return Err(proto(e.to_string())),
        }
    }
}

async fn run(
    sim: &Simulator,
    stream: &mut Stream,
    full: &str,
    bare: &str,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Outbound>,
    cancel: &CancellationToken,
    drop_rx: &mut tokio::sync::watch::Receiver<u64>,
) -> io::Result<()> {
    let domain = xml::jid_domain(bare).unwrap_or_default();
    let mut pings = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            changed = drop_rx.changed() => {
                if changed.is_ok() {
                    tracing::debug!(jid = %full, "dropping c2s session on request");
                    return Ok(());
                }
            }
            Some(out) = rx.recv() => {
                let res = match out {
                    Outbound::Stanza(el) => stream.send(&el).await,
                    Outbound::Raw(bytes) => write_raw(stream, &bytes).await,
                };
                sim.dequeued(1);
                res?;
            }
            item = stream.next() => match item {
                None | Some(Err(ReadError::StreamFooterReceived)) => return Ok(()),
                Some(Err(ReadError::HardError(e))) => return Err(e),
                Some(Err(ReadError::ParseError(e))) => {
                    tracing::debug!(jid = %full, cause = %e, "unparsable element from client");
                }
                Some(Err(ReadError::SoftTimeout)) => {
                    // Silence: make the client answer something before the hard timeout.
                    pings += 1;
                    let ping = El::new("iq", NS_CLIENT)
                        .attr(xml_ncname!("type"), "get")
                        .attr(xml_ncname!("id"), format!("srv-ping-{pings}"))
                        .attr(xml_ncname!("from"), domain.clone())
                        .attr(xml_ncname!("to"), full)
                        .child(El::new("ping", NS_PING))
                        .build();
                    stream.send(&ping).await?;
                }
                Some(Ok(el)) => {
                    if let Some(reply) = from_client(sim, el, full, bare, &domain) {
                        stream.send(&reply).await?;
                    }
                }
            },
        }
    }
}

/// Writes `bytes` verbatim under the XML stream (the test facility
/// [`Simulator::send_raw`]). Every stanza before them was flushed by its
/// `send`, so they land between two stanzas, exactly as queued.
async fn write_raw(stream: &Stream, bytes: &[u8]) -> io::Result<()> {
    let tcp = stream.get_stream().get_ref();
    let mut written = 0;
    while written < bytes.len() {
        tcp.writable().await?;
        match tcp.try_write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn set_attr(el: &mut Element, name: &'static rxml::NcNameStr, value: &str) {
    el.set_attr(Namespace::NONE, name.to_ncname(), value.to_owned());
}

/// Handle one stanza from a bound client; returns a direct reply, if any.
fn from_client(
    sim: &Simulator,
    mut el: Element,
    full: &str,
    bare: &str,
    domain: &str,
) -> Option<Element> {
    if !(xml::is_stanza(&el, "iq")
        || xml::is_stanza(&el, "message")
        || xml::is_stanza(&el, "presence"))
    {
        tracing::debug!(jid = %full, name = el.name(), "ignoring non-stanza element");
        return None;
    }
    // The server, not the client, decides who a stanza is from.
    set_attr(&mut el, xml_ncname!("from"), full);
    let to = el.attr("to").map(str::to_owned);
    let name = el.name().to_owned();

    if name == "presence" {
        if to.is_none() {
            let available = el.attr("type").is_none();
            let priority = el
                .get_child("priority", NS_CLIENT)
                .and_then(|p| p.text().trim().parse::<i8>().ok())
                .unwrap_or(0);
            sim.session_presence(full, available, priority);
        }
        // Directed presence (e.g. to the services) has no effect here.
        return None;
    }

    let kind = el.attr("type").unwrap_or_default().to_owned();
    let is_request = name == "iq" && (kind == "get" || kind == "set");
    match to.as_deref() {
        Some(t) if sim.serves(t) => {
            sim.handle_stanza(&el);
            None
        }
        None => server_iq(&el, is_request, domain),
        Some(t) if t.eq_ignore_ascii_case(domain) || xml::bare_jid(t).as_deref() == Some(bare) => {
            server_iq(&el, is_request, t)
        }
        Some(t) => {
            if name == "message" {
                sim.deliver_local(el);
                None
            } else if is_request {
                Some(xml::iq_error(
                    &el,
                    t,
                    &StanzaError::new(ErrorType::Cancel, "service-unavailable"),
                ))
            } else {
                None
            }
        }
    }
}

/// Requests to the server itself (or the user's own account).
fn server_iq(el: &Element, is_request: bool, from: &str) -> Option<Element> {
    if !is_request {
        return None;
    }
    let get = el.attr("type") == Some("get");
    if get && el.has_child("ping", NS_PING) {
        return Some(xml::iq_result(el, from, None));
    }
    if el.has_child("session", NS_SESSION) {
        return Some(xml::iq_result(el, from, None));
    }
    if get && el.has_child("query", NS_ROSTER) {
        return Some(xml::iq_result(
            el,
            from,
            Some(El::new("query", NS_ROSTER).build()),
        ));
    }
    if get && el.has_child("query", NS_DISCO_INFO) {
        let q = El::new("query", NS_DISCO_INFO)
            .child(
                El::new("identity", NS_DISCO_INFO)
                    .attr(xml_ncname!("category"), "server")
                    .attr(xml_ncname!("type"), "im"),
            )
            .child(El::new("feature", NS_DISCO_INFO).attr(xml_ncname!("var"), NS_PING))
            .build();
        return Some(xml::iq_result(el, from, Some(q)));
    }
    Some(xml::iq_error(
        el,
        from,
        &StanzaError::new(ErrorType::Cancel, "service-unavailable"),
    ))
}
