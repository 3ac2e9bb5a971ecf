//! Opening an XMPP client link: TCP, STARTTLS with our own trust roots,
//! SASL, resource binding, initial presence. I/O edge.
//!
//! We drive tokio-xmpp's stream layer ourselves instead of using
//! `tokio_xmpp::Client` because that client retries a wrong password or an
//! untrusted certificate forever without telling anyone, and never reports a
//! disconnect: the exporter must see every failure (`onsip_xmpp_errors_total`)
//! and own its reconnect policy. Doing STARTTLS here also lets us trust a
//! private CA file (`--xmpp.ca-file`) without a process-wide variable.

use std::borrow::Cow;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sasl::common::{ChannelBinding, Credentials};
use tokio::io::BufStream;
use tokio_rustls::rustls;
use tokio_xmpp::connect::{AsyncReadAndWrite, DnsConfig};
use tokio_xmpp::parsers::bind::{BindQuery, BindResponse};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::FullJid;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::xmlstream::{
    initiate_stream, PendingFeaturesRecv, ReadError, StreamHeader, Timeouts, XmppStream,
    XmppStreamElement,
};
use tokio_xmpp::Stanza;

use crate::config::{Server, Transport, XmppConfig};
use crate::status::ErrorKind;
use crate::xml_guard::{Guarded, Limits as XmlLimits};

/// The stream type after login, boxed so TLS and plaintext links share code.
pub type Stream = XmppStream<Box<dyn AsyncReadAndWrite + Send + 'static>>;

/// A logged-in, bound link with presence sent.
pub struct Link {
    pub stream: Stream,
    pub bound_jid: FullJid,
}

/// Why a link could not be opened; `kind` feeds the error metric.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LinkError {
    pub kind: ErrorKind,
    pub message: String,
}

fn fail(kind: ErrorKind, message: impl Into<String>) -> LinkError {
    LinkError {
        kind,
        message: message.into(),
    }
}

/// Sorts tokio-xmpp's errors into our kinds.
fn classify(err: tokio_xmpp::Error) -> LinkError {
    use tokio_xmpp::Error as E;
    let kind = match &err {
        E::Auth(_) => ErrorKind::Auth,
        E::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
        E::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => ErrorKind::Stream,
        E::Io(_) | E::Connection(_) | E::DnsProto(_) | E::DnsNet(_) | E::Idna => ErrorKind::Connect,
        _ => ErrorKind::Stream,
    };
    fail(kind, err.to_string())
}

/// Sorts a stream read failure into our kinds.
pub fn read_error(err: ReadError) -> LinkError {
    match err {
        ReadError::HardError(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            fail(ErrorKind::Timeout, "no answer from the server")
        }
        ReadError::HardError(io) => fail(ErrorKind::Stream, io.to_string()),
        ReadError::ParseError(e) => fail(ErrorKind::Stream, e.to_string()),
        ReadError::StreamFooterReceived => fail(ErrorKind::Stream, "server closed the stream"),
        ReadError::SoftTimeout => fail(ErrorKind::Timeout, "server went silent"),
    }
}

/// Builds the TLS client configuration once: the system's roots plus an
/// optional extra CA file. Errors name the file.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system bundle may hold certificates rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("--xmpp.ca-file: cannot open {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
            let cert =
                cert.map_err(|e| format!("--xmpp.ca-file: {} is not PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--xmpp.ca-file: {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "--xmpp.ca-file: {} holds no certificate",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn header(domain: &str) -> StreamHeader<'_> {
    StreamHeader {
        to: Some(Cow::Borrowed(domain)),
        from: None,
        id: None,
    }
}

/// Opens a link: connect, secure, authenticate, bind, send presence.
/// The whole procedure is bounded by `config.timeout` per step.
pub async fn open(
    config: &XmppConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Link, LinkError> {
    let domain = config.jid.domain().as_str().to_owned();
    let timeouts = Timeouts {
        read_timeout: config.keepalive,
        response_timeout: config.timeout,
    };
    let dns = match &config.server {
        Server::HostPort(host, port) => DnsConfig::no_srv(host, *port),
        Server::Srv => match config.transport {
            Transport::StartTls { direct: true, .. } => DnsConfig::srv_xmpps(&domain),
            _ => DnsConfig::srv_default_client(&domain),
        },
    };
    let step = config.timeout;
    let tcp = within(step, "connect", dns.resolve())
        .await?
        .map_err(classify)?;
    let _ = tcp.set_nodelay(true);

    let pending: PendingFeaturesRecv<Box<dyn AsyncReadAndWrite + Send>> = match &config.transport {
        Transport::PlaintextForTests => {
            let io: Box<dyn AsyncReadAndWrite + Send> =
                Box::new(BufStream::new(Guarded::new(tcp, XmlLimits::default())));
            within(
                step,
                "stream header",
                initiate_stream(io, ns::JABBER_CLIENT, header(&domain), timeouts),
            )
            .await?
            .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?
        }
        Transport::StartTls { direct, .. } => {
            let tls = tls.ok_or_else(|| fail(ErrorKind::Tls, "no TLS configuration"))?;
            let secured = if *direct {
                within(step, "TLS handshake", handshake(tcp, &domain, tls)).await??
            } else {
                within(step, "STARTTLS", starttls(tcp, &domain, tls, timeouts)).await??
            };
            let io: Box<dyn AsyncReadAndWrite + Send> =
                Box::new(BufStream::new(Guarded::new(secured, XmlLimits::default())));
            within(
                step,
                "stream header",
                initiate_stream(io, ns::JABBER_CLIENT, header(&domain), timeouts),
            )
            .await?
            .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?
        }
    };
    let (features, stream) = within(step, "stream features", pending.recv_features())
        .await?
        .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;

    let username = config.jid.node().map(|n| n.as_str()).unwrap_or_default();
    let credentials = Credentials::default()
        .with_username(username)
        .with_password(config.password.expose())
        .with_channel_binding(ChannelBinding::None);
    let authenticated = within(
        step,
        "authentication",
        tokio_xmpp::client_login(stream, features.sasl_mechanisms, credentials),
    )
    .await?
    .map_err(classify)?;
    let pending = within(
        step,
        "stream restart",
        authenticated.send_header(header(&domain)),
    )
    .await?
    .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    let (features, mut stream) = within(step, "stream features", pending.recv_features())
        .await?
        .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    if !features.can_bind() {
        return Err(fail(ErrorKind::Stream, "server offers no resource binding"));
    }
    let bound_jid = within(
        step,
        "resource binding",
        bind(&mut stream, &config.resource),
    )
    .await??;

    // Events are addressed to the bare JID: the server delivers those only to
    // resources that sent presence with a non-negative priority.
    send(
        &mut stream,
        Stanza::Presence(Presence::available().with_priority(1)),
    )
    .await
    .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    Ok(Link { stream, bound_jid })
}

async fn within<T>(
    limit: Duration,
    step: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, LinkError> {
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        fail(
            ErrorKind::Timeout,
            format!("{step} took longer than {limit:?}"),
        )
    })
}

/// Negotiates STARTTLS on a fresh TCP connection and returns the TLS stream.
async fn starttls(
    tcp: tokio::net::TcpStream,
    domain: &str,
    tls: &Arc<rustls::ClientConfig>,
    timeouts: Timeouts,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, LinkError> {
    let pending = initiate_stream(
        BufStream::new(tcp),
        ns::JABBER_CLIENT,
        header(domain),
        timeouts,
    )
    .await
    .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    let (features, mut stream) = pending
        .recv_features::<tokio_xmpp::xmlstream::FallibleStreamElement>()
        .await
        .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    if !features.can_starttls() {
        return Err(fail(ErrorKind::Tls, "server does not offer STARTTLS"));
    }
    stream
        .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
            starttls::Request,
        )))
        .await
        .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    loop {
        match stream.next().await {
            Some(Ok(element)) => match element.into_read_error() {
                Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_))) => break,
                Ok(XmppStreamElement::Starttls(_)) => {
                    return Err(fail(ErrorKind::Tls, "server refused STARTTLS"))
                }
                Ok(_) | Err(ReadError::SoftTimeout) => continue,
                Err(err) => return Err(read_error(err)),
            },
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(err)) => return Err(read_error(err)),
            None => return Err(fail(ErrorKind::Stream, "server closed the connection")),
        }
    }
    handshake(stream.into_inner().into_inner(), domain, tls).await
}

/// The TLS handshake, verifying the certificate for the JID's domain.
async fn handshake(
    tcp: tokio::net::TcpStream,
    domain: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, LinkError> {
    let server_name = rustls::pki_types::ServerName::try_from(domain.to_owned())
        .map_err(|e| fail(ErrorKind::Tls, format!("{domain}: {e}")))?;
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| fail(ErrorKind::Tls, e.to_string()))
}

/// Binds `resource` and returns the JID the server assigned.
async fn bind(stream: &mut Stream, resource: &str) -> Result<FullJid, LinkError> {
    const BIND_ID: &str = "bind-1";
    let request = Iq::from_set(BIND_ID, BindQuery::new(Some(resource.to_owned())));
    send(stream, Stanza::Iq(request))
        .await
        .map_err(|e| fail(ErrorKind::Stream, e.to_string()))?;
    loop {
        let element = match stream.next().await {
            Some(Ok(element)) => element.into_read_error(),
            Some(Err(err)) => Err(err),
            None => return Err(fail(ErrorKind::Stream, "server closed the connection")),
        };
        match element {
            Ok(XmppStreamElement::Stanza(Stanza::Iq(Iq::Result {
                id,
                payload: Some(payload),
                ..
            }))) if id == BIND_ID => {
                return BindResponse::try_from(payload)
                    .map(FullJid::from)
                    .map_err(|e| fail(ErrorKind::Stream, format!("bad bind reply: {e}")));
            }
            Ok(XmppStreamElement::Stanza(Stanza::Iq(Iq::Error { id, error, .. })))
                if id == BIND_ID =>
            {
                return Err(fail(
                    ErrorKind::Stream,
                    format!("resource binding refused: {:?}", error.defined_condition),
                ));
            }
            Ok(_) | Err(ReadError::SoftTimeout) => continue,
            Err(err) => return Err(read_error(err)),
        }
    }
}

/// Sends one stanza.
pub async fn send(stream: &mut Stream, stanza: Stanza) -> std::io::Result<()> {
    stream.send(&XmppStreamElement::Stanza(stanza)).await
}
