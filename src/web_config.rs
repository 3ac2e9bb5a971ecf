//! `--web.config.file`: TLS, basic authentication and response headers for
//! the HTTP server, in the YAML format of Prometheus' exporter-toolkit
//! (`web-config.yml`), so a file written for node_exporter works here.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # relative paths: against this file's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! basic_auth_users:
//!   prometheus: $2y$10$...          # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
//!
//! Loading is strict: unknown keys are errors, every error names the key at
//! fault, and the certificate, key and CA files are read and checked at
//! load, so `check-config` and start-up catch a bad file. The pieces of the
//! toolkit's format this server cannot honour (`client_allowed_sans`,
//! `rate_limit`, TLS 1.0/1.1, curve P-521) are refused with a message rather
//! than silently ignored.
//!
//! The second half of the module is basic authentication: parsing the
//! `Authorization` header, comparing user names without an early exit, and
//! a cache of successful bcrypt verifications keyed by a salted SHA-256 of
//! (user, hash, password), so that a scrape every 15 s does not pay bcrypt
//! (50–250 ms at cost 10) each time. The cache never holds a password.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::{CryptoProvider, SupportedKxGroup};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite, SupportedProtocolVersion,
};

/// A web configuration error: the file, the key at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub path: PathBuf,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.path.display(),
                self.field,
                self.message
            )
        }
    }
}

impl std::error::Error for Error {}

// ---------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileWebConfig {
    tls_server_config: Option<FileTls>,
    http_server_config: Option<FileHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// The toolkit's rate limiter: not implemented here, refused by name.
    rate_limit: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: Option<String>,
    key_file: Option<String>,
    /// Inline PEM, instead of `cert_file`.
    cert: Option<String>,
    /// Inline PEM, instead of `key_file`.
    key: Option<String>,
    client_auth_type: Option<String>,
    client_ca_file: Option<String>,
    /// Inline PEM, instead of `client_ca_file`.
    client_ca: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    curve_preferences: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    /// Not implemented here, refused by name.
    client_allowed_sans: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    /// HTTP/2 is not served (HTTP/1.1 only; clients negotiate it by ALPN).
    /// Accepted so toolkit files load.
    #[allow(dead_code)]
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

// ---------------------------------------------------------------------------
// The validated configuration
// ---------------------------------------------------------------------------

/// How client certificates are handled (the toolkit's `client_auth_type`,
/// with Go's `crypto/tls` meanings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Never ask for a certificate.
    NoClientCert,
    /// Ask, accept none or any (unverified).
    RequestClientCert,
    /// Require one, do not verify it against a CA.
    RequireAnyClientCert,
    /// Ask; a certificate given must chain to `client_ca_file`.
    VerifyClientCertIfGiven,
    /// Require one that chains to `client_ca_file` (mutual TLS).
    RequireAndVerifyClientCert,
}

impl ClientAuth {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "" | "NoClientCert" => Self::NoClientCert,
            "RequestClientCert" => Self::RequestClientCert,
            // "RequireClientCert" is the toolkit's old spelling.
            "RequireAnyClientCert" | "RequireClientCert" => Self::RequireAnyClientCert,
            "VerifyClientCertIfGiven" => Self::VerifyClientCertIfGiven,
            "RequireAndVerifyClientCert" => Self::RequireAndVerifyClientCert,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoClientCert => "NoClientCert",
            Self::RequestClientCert => "RequestClientCert",
            Self::RequireAnyClientCert => "RequireAnyClientCert",
            Self::VerifyClientCertIfGiven => "VerifyClientCertIfGiven",
            Self::RequireAndVerifyClientCert => "RequireAndVerifyClientCert",
        }
    }
}

/// TLS as configured: the ready rustls configuration plus what to log.
#[derive(Clone)]
pub struct Tls {
    pub server_config: Arc<ServerConfig>,
    pub client_auth: ClientAuth,
    pub min_version: &'static str,
    pub max_version: &'static str,
}

/// One `basic_auth_users` entry.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// The bcrypt hash (checked to parse at load).
    pub hash: String,
    pub cost: u32,
}

/// A validated `--web.config.file`.
#[derive(Clone)]
pub struct WebConfig {
    /// The file, as given.
    pub path: PathBuf,
    /// `None`: plain HTTP.
    pub tls: Option<Tls>,
    /// Empty: no authentication.
    pub users: Vec<User>,
    /// Added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// What the files looked like when read, to notice a change.
    stamps: Vec<(PathBuf, Option<Stamp>)>,
}

impl fmt::Debug for WebConfig {
    // Names only: no hash, no key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebConfig")
            .field("path", &self.path)
            .field(
                "tls",
                &self.tls.as_ref().map(|t| {
                    format!(
                        "{}..{}, client certificates: {}",
                        t.min_version,
                        t.max_version,
                        t.client_auth.as_str()
                    )
                }),
            )
            .field(
                "basic_auth_users",
                &self
                    .users
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What identifies one version of a file: a Kubernetes secret update swaps
/// a symlink, an editor writes a new inode; either changes this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

/// The state of a web configuration's files at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamps(Vec<Option<Stamp>>);

/// Headers the toolkit lets a file set, with the values allowed (`None`:
/// any). Anything else (Content-Type, Authorization, Set-Cookie...) would let
/// a file break the protocol, so it is refused as the toolkit does.
const SETTABLE_HEADERS: &[(&str, Option<&[&str]>)] = &[
    ("Strict-Transport-Security", None),
    ("X-Content-Type-Options", Some(&["nosniff"])),
    ("X-Frame-Options", Some(&["deny", "sameorigin"])),
    ("X-XSS-Protection", None),
    ("Content-Security-Policy", None),
];

struct Ctx<'a> {
    path: &'a Path,
    dir: PathBuf,
    stamps: Vec<(PathBuf, Option<Stamp>)>,
}

impl Ctx<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error {
            path: self.path.to_path_buf(),
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// Relative paths are relative to the config file's directory, as in
    /// the toolkit.
    fn resolve(&self, file: &str) -> PathBuf {
        let p = Path::new(file);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// Reads a referenced file (stamping it first, so a change made while
    /// reading is noticed later).
    fn read(&mut self, field: &str, file: &str) -> Result<(PathBuf, Vec<u8>), Error> {
        if file.is_empty() {
            return Err(self.err(field, "is empty"));
        }
        let path = self.resolve(file);
        self.stamps.push((path.clone(), stamp(&path)));
        let bytes = std::fs::read(&path)
            .map_err(|e| self.err(field, format!("cannot read {}: {e}", path.display())))?;
        Ok((path, bytes))
    }

    /// PEM from `<name>_file` or inline `<name>`, not both.
    fn pem(
        &mut self,
        file_field: &str,
        file: &Option<String>,
        inline_field: &str,
        inline: &Option<String>,
    ) -> Result<Option<(String, Vec<u8>)>, Error> {
        match (file, inline) {
            (Some(_), Some(_)) => Err(self.err(
                file_field,
                format!("give {file_field} or {inline_field}, not both"),
            )),
            (Some(file), None) => {
                let (path, bytes) = self.read(&format!("tls_server_config.{file_field}"), file)?;
                Ok(Some((path.display().to_string(), bytes)))
            }
            (None, Some(text)) => Ok(Some((
                format!("inline {inline_field}"),
                text.as_bytes().to_vec(),
            ))),
            (None, None) => Ok(None),
        }
    }
}

fn tls_version(text: &str, field: &str, ctx: &Ctx<'_>) -> Result<u8, Error> {
    match text {
        "TLS12" => Ok(2),
        "TLS13" => Ok(3),
        "TLS10" | "TLS11" => Err(ctx.err(
            field,
            format!("{text} is not supported: this server speaks TLS 1.2 and 1.3 only"),
        )),
        _ => Err(ctx.err(field, format!("{text:?} is not one of TLS12, TLS13"))),
    }
}

fn version_name(v: u8) -> &'static str {
    if v == 2 {
        "TLS12"
    } else {
        "TLS13"
    }
}

impl WebConfig {
    /// Reads and validates `path`, including the files it names.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let ctx = Ctx {
            path,
            dir,
            stamps: vec![(path.to_path_buf(), stamp(path))],
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| ctx.err("", format!("cannot read: {e}")))?;
        Self::from_yaml(&text, ctx)
    }

    /// Parses and validates the text of `path` (for tests: files it names
    /// are still read, relative to `path`'s directory).
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_yaml(
            text,
            Ctx {
                path,
                dir,
                stamps: Vec::new(),
            },
        )
    }

    fn from_yaml(text: &str, mut ctx: Ctx<'_>) -> Result<Self, Error> {
        // An empty file is a valid, empty configuration (as in the toolkit).
        let file: FileWebConfig = if text.trim().is_empty() {
            FileWebConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ctx.err("", e.to_string()))?
        };
        if file.rate_limit.is_some() {
            return Err(ctx.err(
                "rate_limit",
                "is not supported by onsip-ua-exporter; remove it",
            ));
        }

        let mut users = Vec::new();
        for (name, hash) in file.basic_auth_users.unwrap_or_default() {
            let field = format!("basic_auth_users.{name}");
            if name.is_empty() || name.contains(':') {
                return Err(ctx.err(&field, "a user name must be non-empty and hold no ':'"));
            }
            let parts: bcrypt::HashParts = hash.parse().map_err(|_| {
                ctx.err(
                    &field,
                    "is not a bcrypt hash (expected $2y$, $2b$ or $2a$...; make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)",
                )
            })?;
            users.push(User {
                name,
                cost: parts.get_cost(),
                hash,
            });
        }

        let mut headers = Vec::new();
        for (name, value) in file
            .http_server_config
            .and_then(|h| h.headers)
            .unwrap_or_default()
        {
            let field = format!("http_server_config.headers.{name}");
            let Some((canonical, allowed)) = SETTABLE_HEADERS
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&name))
            else {
                let names: Vec<&str> = SETTABLE_HEADERS.iter().map(|(n, _)| *n).collect();
                return Err(ctx.err(
                    &field,
                    format!("cannot be configured (allowed: {})", names.join(", ")),
                ));
            };
            if let Some(allowed) = allowed {
                if !allowed.contains(&value.as_str()) {
                    return Err(ctx.err(
                        &field,
                        format!("{value:?} is not one of {}", allowed.join(", ")),
                    ));
                }
            }
            let header_value = HeaderValue::from_str(&value)
                .map_err(|_| ctx.err(&field, "is not a valid header value"))?;
            headers.push((HeaderName::from_static(lower(canonical)), header_value));
        }

        let tls = match file.tls_server_config {
            None => None,
            Some(t) => Some(build_tls(&t, &mut ctx)?),
        };
        Ok(Self {
            path: ctx.path.to_path_buf(),
            tls,
            users,
            headers,
            stamps: ctx.stamps,
        })
    }

    /// How the files this configuration was read from look now.
    pub fn look(&self) -> FileStamps {
        FileStamps(self.stamps.iter().map(|(path, _)| stamp(path)).collect())
    }

    /// Whether `now` (from [`Self::look`]) differs from what was read.
    pub fn differs(&self, now: &FileStamps) -> bool {
        self.stamps.len() != now.0.len()
            || self
                .stamps
                .iter()
                .zip(&now.0)
                .any(|((_, old), new)| old != new)
    }

    /// Takes `now` as seen, so that a change that could not be applied is
    /// reported once, not at every check (stamps taken before the failed
    /// reload: a later change is still noticed).
    pub fn mark_seen(&mut self, now: FileStamps) {
        for ((_, seen), new) in self.stamps.iter_mut().zip(now.0) {
            *seen = new;
        }
    }

    /// A one-line summary for logs and `check-config`.
    pub fn summary(&self) -> String {
        let tls = match &self.tls {
            Some(t) => format!(
                "TLS on ({}..{}, client certificates: {})",
                t.min_version,
                t.max_version,
                t.client_auth.as_str()
            ),
            None => "TLS off".to_owned(),
        };
        let auth = if self.users.is_empty() {
            "basic auth off".to_owned()
        } else {
            format!("basic auth on ({} users)", self.users.len())
        };
        format!("{tls}, {auth}, {} extra headers", self.headers.len())
    }
}

/// The lower-case spelling of a settable header (HeaderName needs it).
fn lower(name: &str) -> &'static str {
    match name {
        "Strict-Transport-Security" => "strict-transport-security",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-Frame-Options" => "x-frame-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "content-security-policy",
    }
}

fn build_tls(t: &FileTls, ctx: &mut Ctx<'_>) -> Result<Tls, Error> {
    if t.client_allowed_sans.is_some() {
        return Err(ctx.err(
            "tls_server_config.client_allowed_sans",
            "is not supported by onsip-ua-exporter; use client_ca_file with a CA that signs only the allowed clients",
        ));
    }
    let cert = ctx
        .pem("cert_file", &t.cert_file, "cert", &t.cert)?
        .ok_or_else(|| {
            ctx.err(
                "tls_server_config.cert_file",
                "is required when TLS is configured",
            )
        })?;
    let key = ctx
        .pem("key_file", &t.key_file, "key", &t.key)?
        .ok_or_else(|| {
            ctx.err(
                "tls_server_config.key_file",
                "is required when TLS is configured",
            )
        })?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.1.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| ctx.err("tls_server_config.cert_file", format!("{}: {e}", cert.0)))?;
    if certs.is_empty() {
        return Err(ctx.err(
            "tls_server_config.cert_file",
            format!("{}: no PEM certificate found", cert.0),
        ));
    }
    let private_key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key.1.as_slice())
        .map_err(|e| ctx.err("tls_server_config.key_file", format!("{}: {e}", key.0)))?
        .ok_or_else(|| {
            ctx.err(
                "tls_server_config.key_file",
                format!("{}: no PEM private key found", key.0),
            )
        })?;

    let client_auth = ClientAuth::parse(t.client_auth_type.as_deref().unwrap_or(""))
        .ok_or_else(|| {
            ctx.err(
                "tls_server_config.client_auth_type",
                format!(
                    "{:?} is not one of NoClientCert, RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert",
                    t.client_auth_type.as_deref().unwrap_or("")
                ),
            )
        })?;
    let client_ca = ctx.pem(
        "client_ca_file",
        &t.client_ca_file,
        "client_ca",
        &t.client_ca,
    )?;

    let min = tls_version(
        t.min_version.as_deref().unwrap_or("TLS12"),
        "tls_server_config.min_version",
        ctx,
    )?;
    let max = tls_version(
        t.max_version.as_deref().unwrap_or("TLS13"),
        "tls_server_config.max_version",
        ctx,
    )?;
    if min > max {
        return Err(ctx.err(
            "tls_server_config.min_version",
            format!(
                "{} is above max_version {}",
                version_name(min),
                version_name(max)
            ),
        ));
    }
    let versions: Vec<&'static SupportedProtocolVersion> =
        [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect();

    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(names) = &t.cipher_suites {
        provider.cipher_suites = select_suites(names, &provider.cipher_suites, ctx)?;
    }
    if let Some(names) = &t.curve_preferences {
        provider.kx_groups = select_curves(names, ctx)?;
    }
    let provider = Arc::new(provider);

    let roots = match &client_ca {
        None => None,
        Some((origin, pem)) => {
            let mut roots = RootCertStore::empty();
            let mut count = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| {
                    ctx.err("tls_server_config.client_ca_file", format!("{origin}: {e}"))
                })?;
                roots.add(cert).map_err(|e| {
                    ctx.err("tls_server_config.client_ca_file", format!("{origin}: {e}"))
                })?;
                count += 1;
            }
            if count == 0 {
                return Err(ctx.err(
                    "tls_server_config.client_ca_file",
                    format!("{origin}: no PEM certificate found"),
                ));
            }
            Some(Arc::new(roots))
        }
    };
    let verifier: Arc<dyn ClientCertVerifier> = match (client_auth, roots) {
        (ClientAuth::NoClientCert, Some(_)) => {
            return Err(ctx.err(
                "tls_server_config.client_ca_file",
                "is set but client_auth_type is NoClientCert (set it to RequireAndVerifyClientCert for mutual TLS)",
            ))
        }
        (ClientAuth::NoClientCert, None) => Arc::new(rustls::server::NoClientAuth),
        (ClientAuth::RequestClientCert, _) => Arc::new(AnyClientCert {
            mandatory: false,
            provider: provider.clone(),
        }),
        (ClientAuth::RequireAnyClientCert, _) => Arc::new(AnyClientCert {
            mandatory: true,
            provider: provider.clone(),
        }),
        (ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert, None) => {
            return Err(ctx.err(
                "tls_server_config.client_ca_file",
                format!("is required with client_auth_type {}", client_auth.as_str()),
            ))
        }
        (mode, Some(roots)) => {
            let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            let builder = if mode == ClientAuth::VerifyClientCertIfGiven {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder.build().map_err(|e| {
                ctx.err("tls_server_config.client_ca_file", format!("{e}"))
            })?
        }
    };

    let mut server_config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| ctx.err("tls_server_config", format!("{e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, private_key)
        .map_err(|e| {
            ctx.err(
                "tls_server_config.key_file",
                format!("certificate and key do not make a usable pair: {e}"),
            )
        })?;
    server_config.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    server_config.ignore_client_order = t.prefer_server_cipher_suites.unwrap_or(true);
    Ok(Tls {
        server_config: Arc::new(server_config),
        client_auth,
        min_version: version_name(min),
        max_version: version_name(max),
    })
}

/// TLS 1.2 suites by their IANA (= Go) names; TLS 1.3 suites are always on,
/// as in Go, which does not let them be configured.
fn select_suites(
    names: &[String],
    available: &[SupportedCipherSuite],
    ctx: &Ctx<'_>,
) -> Result<Vec<SupportedCipherSuite>, Error> {
    let field = "tls_server_config.cipher_suites";
    let mut chosen: Vec<SupportedCipherSuite> = available
        .iter()
        .filter(|s| s.tls13().is_some())
        .copied()
        .collect();
    for name in names {
        // Go also accepts the short ChaCha20 names.
        let wanted = match name.as_str() {
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
            }
            other => other,
        };
        let suite = available
            .iter()
            .find(|s| format!("{:?}", s.suite()) == wanted)
            .ok_or_else(|| {
                let known: Vec<String> = available
                    .iter()
                    .filter(|s| s.tls13().is_none())
                    .map(|s| format!("{:?}", s.suite()))
                    .collect();
                ctx.err(
                    field,
                    format!(
                        "{name:?} is unknown or not supported (TLS 1.2 suites: {})",
                        known.join(", ")
                    ),
                )
            })?;
        if !chosen.contains(suite) {
            chosen.push(*suite);
        }
    }
    Ok(chosen)
}

fn select_curves(
    names: &[String],
    ctx: &Ctx<'_>,
) -> Result<Vec<&'static dyn SupportedKxGroup>, Error> {
    use rustls::crypto::ring::kx_group;
    let field = "tls_server_config.curve_preferences";
    let mut groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    for name in names {
        let group = match name.as_str() {
            "X25519" => kx_group::X25519,
            "CurveP256" => kx_group::SECP256R1,
            "CurveP384" => kx_group::SECP384R1,
            "CurveP521" => {
                return Err(ctx.err(
                    field,
                    "CurveP521 is not supported (X25519, CurveP256, CurveP384 are)",
                ))
            }
            other => {
                return Err(ctx.err(
                    field,
                    format!("{other:?} is not one of X25519, CurveP256, CurveP384"),
                ))
            }
        };
        if !groups.iter().any(|g| g.name() == group.name()) {
            groups.push(group);
        }
    }
    if groups.is_empty() {
        return Err(ctx.err(field, "is empty"));
    }
    Ok(groups)
}

/// `RequestClientCert` / `RequireAnyClientCert`: a certificate is asked for
/// (and with `mandatory` required) but not checked against any CA, as in
/// Go. The handshake signature is still verified, so the client must hold
/// the certificate's key.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Basic authentication
// ---------------------------------------------------------------------------

/// What an `Authorization` header holds.
#[derive(PartialEq, Eq)]
pub enum Credentials {
    Missing,
    Malformed,
    Basic { user: String, password: String },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("Missing"),
            Self::Malformed => f.write_str("Malformed"),
            Self::Basic { .. } => f.write_str("Basic { <secret> }"),
        }
    }
}

impl Credentials {
    /// Parses `Basic <base64(user:password)>` (scheme case-insensitive).
    pub fn parse(header: Option<&HeaderValue>) -> Self {
        let Some(header) = header else {
            return Self::Missing;
        };
        let Ok(text) = header.to_str() else {
            return Self::Malformed;
        };
        let text = text.trim();
        let Some((scheme, encoded)) = text.split_once(' ') else {
            return Self::Malformed;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return Self::Malformed;
        }
        let Some(decoded) = base64_decode(encoded.trim()) else {
            return Self::Malformed;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return Self::Malformed;
        };
        match decoded.split_once(':') {
            Some((user, password)) => Self::Basic {
                user: user.to_owned(),
                password: password.to_owned(),
            },
            None => Self::Malformed,
        }
    }
}

/// Standard base64 (with or without padding); `None` if invalid.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    // Clients differ on padding; accept both, as the exporter-toolkit does.
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
    .decode(text)
    .ok()
}

/// Equality that looks at every byte of both (no early exit on the first
/// difference), so response times do not tell how much of a name matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..len {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

/// SHA-256 through rustls' ring provider (no extra crate).
fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    if let SupportedCipherSuite::Tls13(s) = suite {
        let mut ctx = s.common.hash_provider.start();
        for part in parts {
            ctx.update(part);
        }
        let digest = ctx.finish();
        let bytes = digest.as_ref();
        let n = bytes.len().min(32);
        out[..n].copy_from_slice(&bytes[..n]);
    }
    out
}

/// Successful verifications remembered at most (then the cache starts over).
const CACHE_CAPACITY: usize = 256;

/// The outcome of a check before bcrypt: either decided, or bcrypt must run
/// on `hash` (a user's, or the decoy for an unknown user).
pub enum Precheck {
    Allowed,
    Denied(&'static str),
    NeedsBcrypt {
        known_user: bool,
        hash: String,
        cost: u32,
        password: String,
        key: [u8; 32],
    },
}

/// Basic-auth verification with a cache of successes. The cache key is a
/// SHA-256 of a per-process random salt, the user, its bcrypt hash (so a
/// changed hash in a reloaded file invalidates it) and the password: the
/// password is never kept.
pub struct Authenticator {
    salt: [u8; 32],
    cache: Mutex<HashSet<[u8; 32]>>,
    /// A hash for unknown users, at the users' cost, so an unknown name
    /// costs as much time as a wrong password.
    decoy: Mutex<Option<(u32, String)>>,
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::new()
    }
}

impl Authenticator {
    pub fn new() -> Self {
        Self {
            salt: rand::random(),
            cache: Mutex::new(HashSet::new()),
            decoy: Mutex::new(None),
        }
    }

    fn key(&self, user: &str, hash: &str, password: &str) -> [u8; 32] {
        sha256(&[
            &self.salt,
            &(user.len() as u64).to_be_bytes(),
            user.as_bytes(),
            &(hash.len() as u64).to_be_bytes(),
            hash.as_bytes(),
            password.as_bytes(),
        ])
    }

    /// Everything short of bcrypt: header parsing, user lookup, the cache.
    pub fn precheck(&self, users: &[User], credentials: Credentials) -> Precheck {
        let (user, password) = match credentials {
            Credentials::Missing => return Precheck::Denied("no credentials"),
            Credentials::Malformed => return Precheck::Denied("malformed Authorization header"),
            Credentials::Basic { user, password } => (user, password),
        };
        // Look at every user, stop at none.
        let mut found: Option<&User> = None;
        for u in users {
            if constant_time_eq(u.name.as_bytes(), user.as_bytes()) {
                found = Some(u);
            }
        }
        let (known_user, hash, cost) = match found {
            Some(u) => (true, u.hash.clone(), u.cost),
            None => {
                let cost = users.iter().map(|u| u.cost).max().unwrap_or(10);
                (false, String::new(), cost)
            }
        };
        let key = self.key(&user, &hash, &password);
        if known_user && self.cached(&key) {
            return Precheck::Allowed;
        }
        Precheck::NeedsBcrypt {
            known_user,
            hash,
            cost,
            password,
            key,
        }
    }

    /// Whether this (user, hash, password) was verified before.
    pub fn cached(&self, key: &[u8; 32]) -> bool {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// The slow part (call off the async threads): bcrypt, then remember a
    /// success. Unknown users are checked against a decoy hash and denied.
    pub fn verify(
        &self,
        known_user: bool,
        hash: &str,
        cost: u32,
        password: &str,
        key: [u8; 32],
    ) -> bool {
        if known_user {
            // Another request may have verified the same while we waited.
            if self.cached(&key) {
                return true;
            }
            let ok = bcrypt::verify(password, hash).unwrap_or(false);
            if ok {
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(key);
            }
            ok
        } else {
            let decoy = {
                let mut slot = self.decoy.lock().unwrap_or_else(|p| p.into_inner());
                match &*slot {
                    Some((c, h)) if *c == cost => h.clone(),
                    _ => {
                        let h = bcrypt::hash("onsip-ua-exporter decoy", cost).unwrap_or_default();
                        *slot = Some((cost, h.clone()));
                        h
                    }
                }
            };
            let _ = bcrypt::verify(password, &decoy);
            false
        }
    }

    /// Successful verifications remembered now.
    pub fn cache_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, Error> {
        WebConfig::parse(Path::new("/nonexistent/web.yml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn empty_file_is_plain_http_without_auth() {
        let c = parse("").expect("valid");
        assert!(c.tls.is_none() && c.users.is_empty() && c.headers.is_empty());
        assert_eq!(c.summary(), "TLS off, basic auth off, 0 extra headers");
    }

    #[test]
    fn users_and_headers() {
        let hash = bcrypt::hash("pw", 4).expect("hash");
        let c = parse(&format!(
            "basic_auth_users:\n  prometheus: '{hash}'\nhttp_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000\n"
        ))
        .expect("valid");
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].name, "prometheus");
        assert_eq!(c.users[0].cost, 4);
        assert_eq!(c.headers.len(), 2);
        let printed = format!("{c:?}");
        assert!(!printed.contains(&hash), "{printed}");
        assert!(printed.contains("prometheus"), "{printed}");
    }

    /// Each bad file and the exact message it gives.
    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("basic_auth_users:\n  alice: notahash\n", "/nonexistent/web.yml: basic_auth_users.alice: is not a bcrypt hash (expected $2y$, $2b$ or $2a$...; make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"),
            ("http_server_config:\n  headers:\n    Content-Type: text/plain\n", "/nonexistent/web.yml: http_server_config.headers.Content-Type: cannot be configured (allowed: Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, Content-Security-Policy)"),
            ("http_server_config:\n  headers:\n    Authorization: x\n", "/nonexistent/web.yml: http_server_config.headers.Authorization: cannot be configured (allowed: Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, Content-Security-Policy)"),
            ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "/nonexistent/web.yml: http_server_config.headers.X-Frame-Options: \"allow\" is not one of deny, sameorigin"),
            ("rate_limit:\n  burst: 1\n", "/nonexistent/web.yml: rate_limit: is not supported by onsip-ua-exporter; remove it"),
            ("tls_server_config:\n  key_file: k.pem\n", "/nonexistent/web.yml: tls_server_config.cert_file: is required when TLS is configured"),
            ("tls_server_config:\n  cert_file: c.pem\n", "/nonexistent/web.yml: tls_server_config.cert_file: cannot read /nonexistent/c.pem: No such file or directory (os error 2)"),
            ("tls_server_config:\n  client_allowed_sans: [a]\n", "/nonexistent/web.yml: tls_server_config.client_allowed_sans: is not supported by onsip-ua-exporter; use client_ca_file with a CA that signs only the allowed clients"),
        ];
        for (text, expected) in cases {
            assert_eq!(err(text), expected);
        }
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = err("tls_server_config:\n  cert_fil: x\n");
        assert!(
            e.contains("tls_server_config: unknown field `cert_fil`"),
            "{e}"
        );
        let e = err("basic_auth_user:\n  a: b\n");
        assert!(e.contains("unknown field `basic_auth_user`"), "{e}");
    }

    #[test]
    fn base64() {
        assert_eq!(
            base64_decode("YWxpY2U6c2VjcmV0").as_deref(),
            Some(&b"alice:secret"[..])
        );
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode("YWI").as_deref(), Some(&b"ab"[..]));
        assert_eq!(base64_decode(""), Some(Vec::new()));
        assert_eq!(base64_decode("Y"), None);
        assert_eq!(base64_decode("YW=I"), None);
        assert_eq!(base64_decode("Y==="), None);
        assert_eq!(base64_decode("a!bc"), None);
    }

    #[test]
    fn credentials_parse() {
        let h = HeaderValue::from_static("Basic YWxpY2U6c2U6Y3JldA==");
        assert_eq!(
            Credentials::parse(Some(&h)),
            Credentials::Basic {
                user: "alice".into(),
                password: "se:cret".into()
            }
        );
        assert_eq!(Credentials::parse(None), Credentials::Missing);
        let bearer = HeaderValue::from_static("Bearer abc");
        assert_eq!(Credentials::parse(Some(&bearer)), Credentials::Malformed);
        let no_colon = HeaderValue::from_static("basic YWxpY2U=");
        assert_eq!(Credentials::parse(Some(&no_colon)), Credentials::Malformed);
        assert_eq!(
            format!("{:?}", Credentials::parse(Some(&h))),
            "Basic { <secret> }"
        );
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"alice", b"alice"));
        assert!(!constant_time_eq(b"alice", b"alicf"));
        assert!(!constant_time_eq(b"alice", b"alic"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn success_is_cached_failure_is_not() {
        let users = vec![User {
            name: "alice".into(),
            hash: bcrypt::hash("right", 4).expect("hash"),
            cost: 4,
        }];
        let auth = Authenticator::new();
        let creds = |u: &str, p: &str| Credentials::Basic {
            user: u.into(),
            password: p.into(),
        };
        let run = |c: Credentials| match auth.precheck(&users, c) {
            Precheck::Allowed => (true, true),
            Precheck::Denied(_) => (false, true),
            Precheck::NeedsBcrypt {
                known_user,
                hash,
                cost,
                password,
                key,
            } => (auth.verify(known_user, &hash, cost, &password, key), false),
        };
        assert_eq!(run(creds("alice", "wrong")), (false, false));
        assert_eq!(run(creds("alice", "wrong")), (false, false));
        assert_eq!(run(creds("alice", "right")), (true, false));
        assert_eq!(
            run(creds("alice", "right")),
            (true, true),
            "second time from the cache"
        );
        assert_eq!(run(creds("bob", "right")), (false, false));
        assert_eq!(run(Credentials::Missing), (false, true));
        assert_eq!(auth.cache_len(), 1);
        // A changed hash (file reloaded) is a different key.
        let changed = vec![User {
            hash: bcrypt::hash("right", 4).expect("hash"),
            ..users[0].clone()
        }];
        assert!(matches!(
            auth.precheck(&changed, creds("alice", "right")),
            Precheck::NeedsBcrypt { .. }
        ));
    }
}
