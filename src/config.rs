//! Configuration: flags, environment and an optional YAML file, resolved once
//! into one validated, typed, immutable `Config`.
//!
//! Precedence: flag > environment variable > file > built-in default. Every
//! error names the flag or file key at fault. Secrets (passwords) are read
//! only from a file or an environment variable and live in `Secret`, whose
//! `Debug` prints `<secret>`, so they cannot leak through a log line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::stanza::SipAddress;
use crate::state::Limits;

/// The port registered for this exporter's `/metrics` by default.
pub const DEFAULT_PORT: u16 = 9847;
pub const DEFAULT_AUTH_JID: &str = "commands.auth.xmpp.onsip.com";
pub const DEFAULT_PUBSUB_JID: &str = "pubsub.user-agents.xmpp.onsip.com";
pub const PASSWORD_ENV: &str = "ONSIP_XMPP_PASSWORD";
pub const AUTH_PASSWORD_ENV: &str = "ONSIP_AUTH_PASSWORD";

/// A password. Never printed, never compared in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// A configuration error; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Logfmt,
    Json,
}

#[derive(Parser, Debug)]
#[command(
    name = "onsip-ua-exporter",
    version,
    about = "Prometheus exporter for OnSIP's XMPP User-Agent PubSub service: which SIP phones are registered, per address.",
    after_help = "Every flag can also be set by the environment variable shown. Passwords are read only from a file (--xmpp.password-file) or the ONSIP_XMPP_PASSWORD / ONSIP_AUTH_PASSWORD environment variables."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the exporter (the default).
    Run,
    /// Validate flags, environment and config file, print the result, exit 0 or 1.
    CheckConfig,
    /// Run the built-in OnSIP simulator and the exporter against it, with phones that come and go.
    Demo(DemoArgs),
    /// Run the built-in OnSIP simulator alone (its XMPP face) with a fleet and a load, for benchmarks against an exporter.
    Simulate(SimulateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo's exporter serves /metrics.
    #[arg(long = "web.listen-address", default_value = "127.0.0.1:9847")]
    pub listen_address: SocketAddr,
    /// SIP addresses per domain in the demo fleet (three domains).
    #[arg(long = "demo.phones", default_value_t = 6)]
    pub phones: usize,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Where the simulator's XMPP (client-to-server) face listens.
    #[arg(long = "sim.listen-address", default_value = "127.0.0.1:5222")]
    pub listen_address: SocketAddr,
    /// SIP addresses in the fleet; the account is authorized for every one.
    #[arg(long = "sim.addresses", default_value_t = 1000)]
    pub addresses: usize,
    /// SIP domains the addresses are spread over.
    #[arg(long = "sim.domains", default_value_t = 50)]
    pub domains: usize,
    /// How long to wait for an exporter to subscribe before the load starts.
    #[arg(long = "sim.wait", default_value = "10m", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// After the load, read more loads from standard input, one a line, written as --load.* flags.
    #[arg(long = "sim.commands")]
    pub commands: bool,
    /// Log level of the simulator: error, warn, info, debug, trace.
    #[arg(long = "log.level", default_value = "warn")]
    pub log_level: String,
    #[command(flatten)]
    pub load: crate::simulate::LoadArgs,
}

/// Flags of the exporter. Options without a default here get theirs in
/// `Config::resolve`, after the file is read, so precedence can be applied.
#[derive(Args, Debug, Default, Clone)]
pub struct Flags {
    /// YAML configuration file (nodes, watched addresses, any setting below).
    #[arg(long = "config.file", env = "ONSIP_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Address to serve HTTP on [default: 0.0.0.0:9847].
    #[arg(long = "web.listen-address", env = "ONSIP_WEB_LISTEN_ADDRESS")]
    pub listen_address: Option<String>,
    /// Path under which to expose metrics [default: /metrics].
    #[arg(long = "web.telemetry-path", env = "ONSIP_WEB_TELEMETRY_PATH")]
    pub telemetry_path: Option<String>,
    /// Web configuration file in Prometheus exporter-toolkit format: TLS, basic auth, response headers.
    #[arg(long = "web.config.file", env = "ONSIP_WEB_CONFIG_FILE")]
    pub web_config_file: Option<PathBuf>,

    /// XMPP account, e.g. alice@example.onsip.com.
    #[arg(long = "xmpp.jid", env = "ONSIP_XMPP_JID")]
    pub jid: Option<String>,
    /// XMPP resource [default: onsip-ua-exporter].
    #[arg(long = "xmpp.resource", env = "ONSIP_XMPP_RESOURCE")]
    pub resource: Option<String>,
    /// File holding the XMPP password (or set ONSIP_XMPP_PASSWORD).
    #[arg(long = "xmpp.password-file", env = "ONSIP_XMPP_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// XMPP server host:port, instead of the SRV lookup of the JID's domain.
    #[arg(long = "xmpp.server", env = "ONSIP_XMPP_SERVER")]
    pub server: Option<String>,
    /// PEM file of extra CA certificates to trust for the XMPP server.
    #[arg(long = "xmpp.ca-file", env = "ONSIP_XMPP_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Connect without TLS. Only for tests on loopback; refused for any other host.
    #[arg(
        long = "xmpp.insecure-plaintext-for-tests",
        env = "ONSIP_XMPP_INSECURE_PLAINTEXT_FOR_TESTS"
    )]
    pub plaintext: bool,
    /// TLS from the first byte (XEP-0368, port 5223; SRV _xmpps-client) instead of STARTTLS.
    #[arg(long = "xmpp.direct-tls", env = "ONSIP_XMPP_DIRECT_TLS")]
    pub direct_tls: bool,
    /// How long to wait for any reply [default: 10s].
    #[arg(long = "xmpp.timeout", env = "ONSIP_XMPP_TIMEOUT", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Silence after which a ping is sent; no answer within --xmpp.timeout means the link is dead [default: 30s].
    #[arg(long = "xmpp.keepalive", env = "ONSIP_XMPP_KEEPALIVE", value_parser = humantime::parse_duration)]
    pub keepalive: Option<Duration>,
    /// Longest wait between reconnect attempts [default: 60s].
    #[arg(long = "xmpp.max-backoff", env = "ONSIP_XMPP_MAX_BACKOFF", value_parser = humantime::parse_duration)]
    pub max_backoff: Option<Duration>,

    /// JID of OnSIP's authorization service [default: commands.auth.xmpp.onsip.com].
    #[arg(long = "onsip.auth-jid", env = "ONSIP_AUTH_JID")]
    pub auth_jid: Option<String>,
    /// JID of OnSIP's User-Agent PubSub service [default: pubsub.user-agents.xmpp.onsip.com].
    #[arg(long = "onsip.pubsub-jid", env = "ONSIP_PUBSUB_JID")]
    pub pubsub_jid: Option<String>,
    /// SIP address to authorize [default: the bare JID].
    #[arg(long = "onsip.sip-address", env = "ONSIP_SIP_ADDRESS")]
    pub sip_address: Option<String>,
    /// File holding the OnSIP web-portal password used to authorize (or set ONSIP_AUTH_PASSWORD) [default: the XMPP password].
    #[arg(long = "onsip.auth-password-file", env = "ONSIP_AUTH_PASSWORD_FILE")]
    pub auth_password_file: Option<PathBuf>,
    /// Also authorize every SIP address with the same owner [default: true].
    #[arg(long = "onsip.auth-for-all", env = "ONSIP_AUTH_FOR_ALL")]
    pub auth_for_all: Option<bool>,
    /// Re-authorize this long before the authorization expires [default: 15m].
    #[arg(long = "onsip.reauthorize-before", env = "ONSIP_REAUTHORIZE_BEFORE", value_parser = humantime::parse_duration)]
    pub reauthorize_before: Option<Duration>,
    /// Pubsub node to subscribe to; repeatable [default: /me/<bare jid>].
    #[arg(long = "onsip.node", env = "ONSIP_NODES", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// SIP address to export even with no device (user@domain); repeatable.
    #[arg(long = "onsip.watch", env = "ONSIP_WATCH", value_delimiter = ',')]
    pub watch: Vec<String>,

    /// Export per-address series (switch off for very large fleets) [default: true].
    #[arg(long = "metrics.per-address", env = "ONSIP_METRICS_PER_ADDRESS")]
    pub per_address: Option<bool>,
    /// Distinct User-Agent strings exported per domain before the rest count as "other" [default: 50].
    #[arg(
        long = "metrics.max-user-agents-per-domain",
        env = "ONSIP_METRICS_MAX_USER_AGENTS_PER_DOMAIN"
    )]
    pub max_user_agents: Option<usize>,
    /// Grace after a registration's expiry before it is dropped as stale [default: 2m].
    #[arg(long = "state.expiry-grace", env = "ONSIP_STATE_EXPIRY_GRACE", value_parser = humantime::parse_duration)]
    pub expiry_grace: Option<Duration>,
    /// Most SIP addresses kept [default: 250000].
    #[arg(long = "state.max-addresses", env = "ONSIP_STATE_MAX_ADDRESSES")]
    pub max_addresses: Option<usize>,
    /// Most devices kept per address [default: 64].
    #[arg(
        long = "state.max-devices-per-address",
        env = "ONSIP_STATE_MAX_DEVICES_PER_ADDRESS"
    )]
    pub max_devices: Option<usize>,
    /// File to keep the devices in across restarts (written atomically).
    #[arg(long = "state.file", env = "ONSIP_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// Least time between two writes of the state file [default: 10s].
    #[arg(long = "state.write-interval", env = "ONSIP_STATE_WRITE_INTERVAL", value_parser = humantime::parse_duration)]
    pub state_write_interval: Option<Duration>,

    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides) [default: info].
    #[arg(long = "log.level", env = "ONSIP_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format [default: logfmt].
    #[arg(long = "log.format", env = "ONSIP_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// The optional YAML file. Unknown keys are errors.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub web: FileWeb,
    #[serde(default)]
    pub xmpp: FileXmpp,
    #[serde(default)]
    pub onsip: FileOnsip,
    #[serde(default)]
    pub metrics: FileMetrics,
    #[serde(default)]
    pub state: FileState,
    #[serde(default)]
    pub log: FileLog,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileWeb {
    pub listen_address: Option<String>,
    pub telemetry_path: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileXmpp {
    pub jid: Option<String>,
    pub resource: Option<String>,
    pub password_file: Option<PathBuf>,
    pub server: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub direct_tls: Option<bool>,
    #[serde(default, with = "humantime_serde_opt")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub keepalive: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    pub max_backoff: Option<Duration>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileOnsip {
    pub auth_jid: Option<String>,
    pub pubsub_jid: Option<String>,
    pub sip_address: Option<String>,
    pub auth_password_file: Option<PathBuf>,
    pub auth_for_all: Option<bool>,
    #[serde(default, with = "humantime_serde_opt")]
    pub reauthorize_before: Option<Duration>,
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub watch: Vec<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileMetrics {
    pub per_address: Option<bool>,
    pub max_user_agents_per_domain: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileState {
    #[serde(default, with = "humantime_serde_opt")]
    pub expiry_grace: Option<Duration>,
    pub max_addresses: Option<usize>,
    pub max_devices_per_address: Option<usize>,
    pub file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    pub write_interval: Option<Duration>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

/// Durations in the file are written as humantime strings ("30s", "15m").
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => humantime::parse_duration(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Where the XMPP server is.
#[derive(Clone, Debug, PartialEq)]
pub enum Server {
    /// SRV lookup of the JID's domain.
    Srv,
    /// An explicit host and port.
    HostPort(String, u16),
}

/// How the XMPP link is protected.
#[derive(Clone, Debug, PartialEq)]
pub enum Transport {
    /// STARTTLS, verifying the certificate against the system roots plus
    /// an optional extra CA file.
    StartTls {
        ca_file: Option<PathBuf>,
        /// TLS from the first byte (XEP-0368, usually port 5223) instead of
        /// STARTTLS.
        direct: bool,
    },
    /// No TLS: only allowed to a loopback host, for tests.
    PlaintextForTests,
}

/// The XMPP side of the configuration.
#[derive(Clone, Debug)]
pub struct XmppConfig {
    pub jid: jid::BareJid,
    pub resource: String,
    pub password: Secret,
    pub server: Server,
    pub transport: Transport,
    pub timeout: Duration,
    pub keepalive: Duration,
    pub max_backoff: Duration,
}

/// The OnSIP side.
#[derive(Clone, Debug)]
pub struct OnsipConfig {
    pub auth_jid: jid::Jid,
    pub pubsub_jid: jid::Jid,
    pub sip_address: String,
    pub auth_password: Secret,
    pub auth_for_all: bool,
    pub reauthorize_before: Duration,
    pub nodes: Vec<String>,
    pub watch: Vec<SipAddress>,
}

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen_address: SocketAddr,
    pub telemetry_path: String,
    /// `--web.config.file`, read and checked (certificates included).
    pub web_config: Option<crate::web_config::WebConfig>,
    pub xmpp: XmppConfig,
    pub onsip: OnsipConfig,
    pub per_address_metrics: bool,
    pub limits: Limits,
    pub state_file: Option<PathBuf>,
    pub state_write_interval: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// Where secrets come from, so tests can supply them without touching the
/// process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

fn read_secret_file(path: &Path, field: &str) -> Result<Secret, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))?;
    // A trailing newline from `echo pw > file` is not part of the password.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(invalid(field, format!("{} is empty", path.display())));
    }
    Ok(Secret::new(text.to_owned()))
}

fn parse_host_port(text: &str, field: &str) -> Result<(String, u16), Error> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| invalid(field, format!("{text:?} is not host:port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .map_err(|_| invalid(field, format!("{port:?} is not a port number")))?;
    if host.is_empty() || port == 0 {
        return Err(invalid(field, format!("{text:?} is not host:port")));
    }
    Ok((host.to_owned(), port))
}

fn parse_listen_address(text: &str) -> Result<SocketAddr, Error> {
    // Accept Go's ":9847" spelling too: it means every interface.
    let text = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_owned()
    };
    text.parse().map_err(|_| {
        invalid(
            "--web.listen-address",
            format!("{text:?} is not an address:port such as 0.0.0.0:{DEFAULT_PORT}"),
        )
    })
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// Reads the file named by the flags (if any) and resolves everything.
    pub fn load(flags: &Flags, env: &dyn Environment) -> Result<Self, Error> {
        let file = match &flags.config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                serde_yaml::from_str(&text).map_err(|e| Error::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Self::resolve(flags, &file, env)
    }

    /// Applies precedence (flag/env > file > default) and validates.
    pub fn resolve(flags: &Flags, file: &FileConfig, env: &dyn Environment) -> Result<Self, Error> {
        let listen_address = parse_listen_address(
            flags
                .listen_address
                .as_deref()
                .or(file.web.listen_address.as_deref())
                .unwrap_or("0.0.0.0:9847"),
        )?;
        let telemetry_path = flags
            .telemetry_path
            .clone()
            .or(file.web.telemetry_path.clone())
            .unwrap_or_else(|| "/metrics".to_owned());
        if !telemetry_path.starts_with('/') || telemetry_path == "/" {
            return Err(invalid(
                "--web.telemetry-path",
                format!("{telemetry_path:?} must start with / and not be / (the status page)"),
            ));
        }

        let web_config = match &flags.web_config_file {
            Some(path) => Some(
                crate::web_config::WebConfig::load(path)
                    .map_err(|e| invalid("--web.config.file", e.to_string()))?,
            ),
            None => None,
        };

        let jid_text = flags.jid.clone().or(file.xmpp.jid.clone()).ok_or_else(|| {
            invalid(
                "--xmpp.jid",
                "required (or ONSIP_XMPP_JID, or xmpp.jid in the file)",
            )
        })?;
        let jid: jid::BareJid = jid_text
            .parse()
            .map_err(|e| invalid("--xmpp.jid", format!("{jid_text:?}: {e}")))?;
        if jid.node().is_none() {
            return Err(invalid(
                "--xmpp.jid",
                format!("{jid_text:?} has no user part (user@domain)"),
            ));
        }
        let resource = flags
            .resource
            .clone()
            .or(file.xmpp.resource.clone())
            .unwrap_or_else(|| "onsip-ua-exporter".to_owned());
        if jid::ResourcePart::new(&resource).is_err() {
            return Err(invalid(
                "--xmpp.resource",
                format!("{resource:?} is not a valid resource"),
            ));
        }

        let password = match (
            &flags.password_file,
            &file.xmpp.password_file,
            env.var(PASSWORD_ENV),
        ) {
            (Some(path), _, _) => read_secret_file(path, "--xmpp.password-file")?,
            (None, Some(path), _) => read_secret_file(path, "xmpp.password_file")?,
            (None, None, Some(value)) if !value.is_empty() => Secret::new(value),
            _ => {
                return Err(invalid(
                    "--xmpp.password-file",
                    format!("no XMPP password: give --xmpp.password-file or set {PASSWORD_ENV}"),
                ))
            }
        };

        let server = match flags.server.as_deref().or(file.xmpp.server.as_deref()) {
            Some(text) => {
                let (host, port) = parse_host_port(text, "--xmpp.server")?;
                Server::HostPort(host, port)
            }
            None => Server::Srv,
        };
        let transport = if flags.plaintext {
            if flags.direct_tls {
                return Err(invalid(
                    "--xmpp.direct-tls",
                    "cannot be combined with --xmpp.insecure-plaintext-for-tests",
                ));
            }
            match &server {
                Server::HostPort(host, _) if is_loopback_host(host) => Transport::PlaintextForTests,
                _ => {
                    return Err(invalid(
                        "--xmpp.insecure-plaintext-for-tests",
                        "only allowed with --xmpp.server on a loopback address",
                    ))
                }
            }
        } else {
            let ca_file = flags.ca_file.clone().or(file.xmpp.ca_file.clone());
            if let Some(path) = &ca_file {
                if !path.is_file() {
                    return Err(invalid(
                        "--xmpp.ca-file",
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
            Transport::StartTls {
                ca_file,
                direct: flags.direct_tls || file.xmpp.direct_tls.unwrap_or(false),
            }
        };
        let timeout = flags
            .timeout
            .or(file.xmpp.timeout)
            .unwrap_or(Duration::from_secs(10));
        let keepalive = flags
            .keepalive
            .or(file.xmpp.keepalive)
            .unwrap_or(Duration::from_secs(30));
        let max_backoff = flags
            .max_backoff
            .or(file.xmpp.max_backoff)
            .unwrap_or(Duration::from_secs(60));
        for (field, value) in [
            ("--xmpp.timeout", timeout),
            ("--xmpp.keepalive", keepalive),
            ("--xmpp.max-backoff", max_backoff),
        ] {
            if value < Duration::from_millis(100) {
                return Err(invalid(field, "must be at least 100ms"));
            }
        }

        let service_jid =
            |flag: &Option<String>, from_file: &Option<String>, default: &str, field: &str| {
                let text = flag
                    .clone()
                    .or(from_file.clone())
                    .unwrap_or_else(|| default.to_owned());
                text.parse::<jid::Jid>()
                    .map_err(|e| invalid(field, format!("{text:?}: {e}")))
            };
        let auth_jid = service_jid(
            &flags.auth_jid,
            &file.onsip.auth_jid,
            DEFAULT_AUTH_JID,
            "--onsip.auth-jid",
        )?;
        let pubsub_jid = service_jid(
            &flags.pubsub_jid,
            &file.onsip.pubsub_jid,
            DEFAULT_PUBSUB_JID,
            "--onsip.pubsub-jid",
        )?;

        let sip_address = flags
            .sip_address
            .clone()
            .or(file.onsip.sip_address.clone())
            .unwrap_or_else(|| jid.to_string());
        SipAddress::parse(&sip_address)
            .map_err(|e| invalid("--onsip.sip-address", e.to_string()))?;

        let auth_password = match (
            &flags.auth_password_file,
            &file.onsip.auth_password_file,
            env.var(AUTH_PASSWORD_ENV),
        ) {
            (Some(path), _, _) => read_secret_file(path, "--onsip.auth-password-file")?,
            (None, Some(path), _) => read_secret_file(path, "onsip.auth_password_file")?,
            (None, None, Some(value)) if !value.is_empty() => Secret::new(value),
            _ => password.clone(),
        };
        let reauthorize_before = flags
            .reauthorize_before
            .or(file.onsip.reauthorize_before)
            .unwrap_or(Duration::from_secs(15 * 60));

        let mut nodes = if flags.nodes.is_empty() {
            file.onsip.nodes.clone()
        } else {
            flags.nodes.clone()
        };
        if nodes.is_empty() {
            nodes.push(format!("/me/{jid}"));
        }
        for (i, node) in nodes.iter().enumerate() {
            if !node.starts_with('/') || node.chars().any(char::is_whitespace) {
                return Err(invalid(
                    "--onsip.node",
                    format!(
                        "node #{} {node:?} must start with / and hold no spaces",
                        i + 1
                    ),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = nodes.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(invalid("--onsip.node", format!("{dup:?} is given twice")));
        }

        let watch_text = if flags.watch.is_empty() {
            &file.onsip.watch
        } else {
            &flags.watch
        };
        let watch = watch_text
            .iter()
            .map(|a| SipAddress::parse(a).map_err(|e| invalid("--onsip.watch", e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;

        let defaults = Limits::default();
        let limits = Limits {
            max_addresses: flags
                .max_addresses
                .or(file.state.max_addresses)
                .unwrap_or(defaults.max_addresses),
            max_devices_per_address: flags
                .max_devices
                .or(file.state.max_devices_per_address)
                .unwrap_or(defaults.max_devices_per_address),
            max_user_agents_per_domain: flags
                .max_user_agents
                .or(file.metrics.max_user_agents_per_domain)
                .unwrap_or(defaults.max_user_agents_per_domain),
            expiry_grace_seconds: flags
                .expiry_grace
                .or(file.state.expiry_grace)
                .map_or(defaults.expiry_grace_seconds, |d| d.as_secs() as i64),
        };
        for (field, value) in [
            ("--state.max-addresses", limits.max_addresses),
            (
                "--state.max-devices-per-address",
                limits.max_devices_per_address,
            ),
            (
                "--metrics.max-user-agents-per-domain",
                limits.max_user_agents_per_domain,
            ),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }

        let state_file = flags.state_file.clone().or(file.state.file.clone());
        if let Some(path) = &state_file {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(invalid(
                    "--state.file",
                    format!("directory {} does not exist", dir.display()),
                ));
            }
        }
        let state_write_interval = flags
            .state_write_interval
            .or(file.state.write_interval)
            .unwrap_or(Duration::from_secs(10));
        if state_write_interval < Duration::from_millis(100) {
            return Err(invalid("--state.write-interval", "must be at least 100ms"));
        }

        let log_level = flags
            .log_level
            .clone()
            .or(file.log.level.clone())
            .unwrap_or_else(|| "info".to_owned());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(invalid(
                "--log.level",
                format!("{log_level:?} is not one of error, warn, info, debug, trace"),
            ));
        }

        Ok(Self {
            listen_address,
            telemetry_path,
            web_config,
            xmpp: XmppConfig {
                jid,
                resource,
                password,
                server,
                transport,
                timeout,
                keepalive,
                max_backoff,
            },
            onsip: OnsipConfig {
                auth_jid,
                pubsub_jid,
                sip_address,
                auth_password,
                auth_for_all: flags
                    .auth_for_all
                    .or(file.onsip.auth_for_all)
                    .unwrap_or(true),
                reauthorize_before,
                nodes,
                watch,
            },
            per_address_metrics: flags
                .per_address
                .or(file.metrics.per_address)
                .unwrap_or(true),
            limits,
            state_file,
            state_write_interval,
            log_level,
            log_format: flags
                .log_format
                .or(file.log.format)
                .unwrap_or(LogFormat::Logfmt),
        })
    }

    /// The full JID we bind (`jid/resource`).
    pub fn full_jid(&self) -> String {
        format!("{}/{}", self.xmpp.jid, self.xmpp.resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn env_with_password() -> FakeEnv {
        FakeEnv(HashMap::from([(PASSWORD_ENV, "hunter2")]))
    }

    fn flags() -> Flags {
        Flags {
            jid: Some("alice@example.onsip.com".into()),
            ..Flags::default()
        }
    }

    fn file(yaml: &str) -> FileConfig {
        serde_yaml::from_str(yaml).expect("yaml")
    }

    #[test]
    fn defaults() {
        let config =
            Config::resolve(&flags(), &FileConfig::default(), &env_with_password()).expect("valid");
        assert_eq!(config.listen_address, "0.0.0.0:9847".parse().expect("addr"));
        assert_eq!(config.onsip.nodes, ["/me/alice@example.onsip.com"]);
        assert_eq!(config.onsip.sip_address, "alice@example.onsip.com");
        assert_eq!(config.onsip.auth_jid.to_string(), DEFAULT_AUTH_JID);
        assert_eq!(config.xmpp.server, Server::Srv);
        assert_eq!(config.onsip.auth_password.expose(), "hunter2");
        assert_eq!(
            config.full_jid(),
            "alice@example.onsip.com/onsip-ua-exporter"
        );
        assert!(config.per_address_metrics && config.onsip.auth_for_all);
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let f = file("web:\n  listen_address: 127.0.0.1:1111\nonsip:\n  nodes: [/example.com/foo]\n  watch: [bob@example.com]\n");
        let config = Config::resolve(&flags(), &f, &env_with_password()).expect("valid");
        assert_eq!(config.listen_address.port(), 1111);
        assert_eq!(config.onsip.nodes, ["/example.com/foo"]);
        assert_eq!(config.onsip.watch[0].to_string(), "bob@example.com");
        let mut with_flag = flags();
        with_flag.listen_address = Some(":2222".into());
        let config = Config::resolve(&with_flag, &f, &env_with_password()).expect("valid");
        assert_eq!(config.listen_address, "0.0.0.0:2222".parse().expect("addr"));
    }

    /// Each bad input and the exact message it must give.
    #[test]
    fn bad_inputs_name_the_field() {
        let cases: Vec<(Flags, &str)> = vec![
            (Flags::default(), "--xmpp.jid: required (or ONSIP_XMPP_JID, or xmpp.jid in the file)"),
            (Flags { jid: Some("example.com".into()), ..Flags::default() }, "--xmpp.jid: \"example.com\" has no user part (user@domain)"),
            (Flags { listen_address: Some("nonsense".into()), ..flags() }, "--web.listen-address: \"nonsense\" is not an address:port such as 0.0.0.0:9847"),
            (Flags { telemetry_path: Some("metrics".into()), ..flags() }, "--web.telemetry-path: \"metrics\" must start with / and not be / (the status page)"),
            (Flags { server: Some("xmpp.example.com".into()), ..flags() }, "--xmpp.server: \"xmpp.example.com\" is not host:port"),
            (Flags { server: Some("xmpp.example.com:99999".into()), ..flags() }, "--xmpp.server: \"99999\" is not a port number"),
            (Flags { plaintext: true, server: Some("xmpp.example.com:5222".into()), ..flags() }, "--xmpp.insecure-plaintext-for-tests: only allowed with --xmpp.server on a loopback address"),
            (Flags { nodes: vec!["me/x".into()], ..flags() }, "--onsip.node: node #1 \"me/x\" must start with / and hold no spaces"),
            (Flags { nodes: vec!["/a".into(), "/a".into()], ..flags() }, "--onsip.node: \"/a\" is given twice"),
            (Flags { watch: vec!["bob".into()], ..flags() }, "--onsip.watch: \"bob\" is not a SIP address user@domain"),
            (Flags { log_level: Some("loud".into()), ..flags() }, "--log.level: \"loud\" is not one of error, warn, info, debug, trace"),
            (Flags { timeout: Some(Duration::from_millis(1)), ..flags() }, "--xmpp.timeout: must be at least 100ms"),
            (Flags { plaintext: true, direct_tls: true, server: Some("127.0.0.1:5223".into()), ..flags() }, "--xmpp.direct-tls: cannot be combined with --xmpp.insecure-plaintext-for-tests"),
            (Flags { max_addresses: Some(0), ..flags() }, "--state.max-addresses: must be at least 1"),
        ];
        for (flags, expected) in cases {
            let err = Config::resolve(&flags, &FileConfig::default(), &env_with_password())
                .expect_err(expected);
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn password_is_required_and_never_printed() {
        let err = Config::resolve(&flags(), &FileConfig::default(), &FakeEnv(HashMap::new()))
            .expect_err("no password");
        assert_eq!(
            err.to_string(),
            "--xmpp.password-file: no XMPP password: give --xmpp.password-file or set ONSIP_XMPP_PASSWORD"
        );
        let config =
            Config::resolve(&flags(), &FileConfig::default(), &env_with_password()).expect("valid");
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("<secret>"));
    }

    #[test]
    fn password_file_strips_one_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret \n").expect("write");
        let config = Config::resolve(
            &Flags {
                password_file: Some(path),
                ..flags()
            },
            &FileConfig::default(),
            &FakeEnv(HashMap::new()),
        )
        .expect("valid");
        assert_eq!(config.xmpp.password.expose(), "s3cret ");
        let missing = Config::resolve(
            &Flags {
                password_file: Some(dir.path().join("nope")),
                ..flags()
            },
            &FileConfig::default(),
            &FakeEnv(HashMap::new()),
        )
        .expect_err("missing file");
        assert!(
            missing
                .to_string()
                .starts_with("--xmpp.password-file: cannot read "),
            "{missing}"
        );
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let err =
            serde_yaml::from_str::<FileConfig>("onsip:\n  nodez: [/a]\n").expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `nodez`"), "{err}");
    }

    #[test]
    fn web_config_file_is_loaded_and_errors_name_the_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.yml");
        let hash = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&path, format!("basic_auth_users:\n  prom: '{hash}'\n")).expect("write");
        let with = |path: PathBuf| Flags {
            web_config_file: Some(path),
            ..flags()
        };
        let config = Config::resolve(
            &with(path.clone()),
            &FileConfig::default(),
            &env_with_password(),
        )
        .expect("valid");
        let web = config.web_config.expect("web config");
        assert_eq!(web.users.len(), 1);
        assert!(web.tls.is_none());
        let no_web =
            Config::resolve(&flags(), &FileConfig::default(), &env_with_password()).expect("valid");
        assert!(no_web.web_config.is_none());

        std::fs::write(
            &path,
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
        )
        .expect("write");
        let err = Config::resolve(
            &with(path.clone()),
            &FileConfig::default(),
            &env_with_password(),
        )
        .expect_err("missing certificate");
        assert_eq!(
            err.to_string(),
            format!(
                "--web.config.file: {}: tls_server_config.cert_file: cannot read {}: No such file or directory (os error 2)",
                path.display(),
                dir.path().join("missing.crt").display()
            )
        );
        let missing = dir.path().join("nope.yml");
        let err = Config::resolve(
            &with(missing.clone()),
            &FileConfig::default(),
            &env_with_password(),
        )
        .expect_err("missing file");
        assert!(
            err.to_string().starts_with(&format!(
                "--web.config.file: {}: cannot read: ",
                missing.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn plaintext_allowed_on_loopback() {
        let config = Config::resolve(
            &Flags {
                plaintext: true,
                server: Some("127.0.0.1:5222".into()),
                ..flags()
            },
            &FileConfig::default(),
            &env_with_password(),
        )
        .expect("valid");
        assert_eq!(config.xmpp.transport, Transport::PlaintextForTests);
    }
}
