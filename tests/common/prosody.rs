//! A real Prosody (Debian's 0.12) for integration tests: one per test, in its own temporary
//! directory, listening on 127.0.0.1 only, on ports picked for it.
//!
//! ```ignore
//! let prosody = Prosody::start();                   // STARTTLS required, test CA, 2 components
//! common::prosody::trust_test_ca();                 // SSL_CERT_FILE -> test CA (this process)
//! prosody.register("alice", "secret");
//! let client = tokio_xmpp::Client::new_starttls(
//!     prosody.jid("alice"), "secret",
//!     DnsConfig::no_srv("127.0.0.1", prosody.c2s_port()), Timeouts::default());
//! ```
//!
//! The binaries come from `PROSODY_BIN` / `PROSODYCTL_BIN`, else from PATH; a missing binary
//! fails the test. Prosody runs in the foreground (`-F`) as a child of the test process and is
//! killed when the [`Prosody`] value drops. If the test is failing at that moment, the tail of
//! Prosody's log is printed. `ONSIP_TEST_KEEP_DIRS=1` keeps the directory (config, data, log).
//!
//! TLS: every Prosody of every test process on this machine uses a server certificate signed by
//! one test CA ([`test_ca`]); so a process can trust all of them through one `SSL_CERT_FILE`
//! ([`trust_test_ca`]), which is what tokio-xmpp's rustls-native-certs reads.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::wait::{find_binary, free_port, loopback, poll_until, server_dir, tail, ChildServer};

/// The VirtualHost unless the builder says otherwise.
pub const DEFAULT_DOMAIN: &str = "example.test";
/// The XEP-0114 shared secret of every component unless the builder says otherwise.
pub const DEFAULT_COMPONENT_SECRET: &str = "test-component-secret";
/// How long a start may take before the test fails (it takes ~0.1–0.3 s).
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// How long a SIGTERM may take before SIGKILL (it takes 0.1–2 s).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The default components for a domain: OnSIP's User-Agent PubSub service and its
/// authorization (ad-hoc commands) service.
pub fn default_components(domain: &str) -> Vec<String> {
    vec![
        format!("pubsub.user-agents.{domain}"),
        format!("commands.auth.{domain}"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Test CA
// ---------------------------------------------------------------------------------------------

/// The machine-wide test CA: a directory in the system temp dir holding `ca.pem` and `ca.key`,
/// created once (atomically, by whichever test process comes first) and reused after.
pub struct TestCa {
    dir: PathBuf,
    cert_path: PathBuf,
    key_pem: String,
}

const CA_DIR_NAME: &str = "onsip-ua-exporter-test-ca-v1";
const CA_COMMON_NAME: &str = "onsip-ua-exporter test CA";

/// The CA's parameters, identical in every process: a server certificate is signed with the
/// CA key and these (issuer name, key identifier method), so it chains to the stored `ca.pem`
/// whichever process wrote it.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, "onsip-ua-exporter tests");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl TestCa {
    fn load(dir: &Path) -> Option<Self> {
        let cert_path = dir.join("ca.pem");
        let key_pem = std::fs::read_to_string(dir.join("ca.key")).ok()?;
        let cert_pem = std::fs::read_to_string(&cert_path).ok()?;
        KeyPair::from_pem(&key_pem).ok()?;
        if !cert_pem.contains("BEGIN CERTIFICATE") {
            return None;
        }
        Some(Self {
            dir: dir.to_path_buf(),
            cert_path,
            key_pem,
        })
    }

    fn create(parent: &Path, dir: &Path) {
        let key = KeyPair::generate().expect("generate the test CA key");
        let cert = ca_params()
            .self_signed(&key)
            .expect("self-sign the test CA certificate");
        let staging = tempfile::Builder::new()
            .prefix(".onsip-ua-exporter-test-ca-new")
            .tempdir_in(parent)
            .expect("create a staging dir for the test CA")
            .keep();
        std::fs::write(staging.join("ca.key"), key.serialize_pem()).expect("write ca.key");
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                staging.join("ca.key"),
                std::fs::Permissions::from_mode(0o600),
            );
        }
        std::fs::write(staging.join("ca.pem"), cert.pem()).expect("write ca.pem");
        // Atomic: fails if another process got there first; its CA is then the one.
        if std::fs::rename(&staging, dir).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
    }

    fn get_or_create() -> Self {
        let parent = std::env::temp_dir();
        let dir = parent.join(CA_DIR_NAME);
        for _ in 0..3 {
            if let Some(ca) = Self::load(&dir) {
                return ca;
            }
            if dir.exists() {
                // Broken (half-deleted by hand?): start over.
                let _ = std::fs::remove_dir_all(&dir);
            }
            Self::create(&parent, &dir);
        }
        panic!("cannot create or load the test CA in {}", dir.display());
    }

    /// The CA certificate (PEM): what a client trusts.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The directory holding the CA.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses; the first is also the
    /// subject CN) and writes `NAME.pem` (leaf then CA) and `NAME.key` into `out_dir`.
    /// Returns (certificate path, key path).
    pub fn issue_server_cert(
        &self,
        names: &[String],
        out_dir: &Path,
        file_stem: &str,
    ) -> (PathBuf, PathBuf) {
        let ca_key = KeyPair::from_pem(&self.key_pem).expect("parse the test CA key");
        let ca_cert = ca_params()
            .self_signed(&ca_key)
            .expect("rebuild the test CA certificate");
        let mut params =
            CertificateParams::new(names.to_vec()).expect("server certificate names are valid");
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate a server key");
        let cert = params
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("sign the server certificate");
        let ca_pem = std::fs::read_to_string(&self.cert_path).expect("read the test CA cert");
        let cert_path = out_dir.join(format!("{file_stem}.pem"));
        let key_path = out_dir.join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca_pem))
            .expect("write the server certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the server key");
        (cert_path, key_path)
    }
}

/// The machine-wide test CA (created on first use).
pub fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(TestCa::get_or_create)
}

/// Makes this process trust the test CA: sets `SSL_CERT_FILE` to it (rustls-native-certs, and
/// so tokio-xmpp, read it at each connection; any `SSL_CERT_DIR` still adds the system CAs).
/// Idempotent. Affects the whole test process, and child processes started after it: call it
/// only in test binaries that talk TLS to these servers. Returns the CA certificate's path.
pub fn trust_test_ca() -> &'static Path {
    static SET: OnceLock<()> = OnceLock::new();
    let path = test_ca().cert_path();
    SET.get_or_init(|| std::env::set_var("SSL_CERT_FILE", path));
    path
}

// ---------------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------------

/// Options for a [`Prosody`]; [`ProsodyBuilder::start`] starts it.
#[derive(Clone, Debug)]
pub struct ProsodyBuilder {
    domain: String,
    tls_required: bool,
    tls13: bool,
    plain: Option<bool>,
    components: Option<Vec<String>>,
    component_secret: String,
    native_pubsub: Option<String>,
    extra_modules: Vec<String>,
    extra_global_config: String,
    extra_host_config: String,
    users: Vec<(String, String)>,
    log_level: String,
}

impl Default for ProsodyBuilder {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_string(),
            tls_required: true,
            tls13: false,
            plain: None,
            components: None,
            component_secret: DEFAULT_COMPONENT_SECRET.to_string(),
            native_pubsub: None,
            extra_modules: Vec::new(),
            extra_global_config: String::new(),
            extra_host_config: String::new(),
            users: Vec::new(),
            log_level: "debug".to_string(),
        }
    }
}

impl ProsodyBuilder {
    /// The VirtualHost (default `example.test`). Default component names follow it.
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_string();
        self
    }

    /// STARTTLS required and SCRAM-SHA-1 (the default): `c2s_require_encryption = true`,
    /// TLS 1.2 only, PLAIN disabled. See [`ProsodyBuilder::allow_tls13`] for why TLS 1.2.
    pub fn tls(mut self) -> Self {
        self.tls_required = true;
        self
    }

    /// Plaintext allowed: `c2s_require_encryption = false`, `allow_unencrypted_plain_auth =
    /// true`, PLAIN and SCRAM-SHA-1 offered (STARTTLS too, with the same certificate).
    pub fn plaintext(mut self) -> Self {
        self.tls_required = false;
        self
    }

    /// Allow TLS 1.3 (Prosody's own default, `tlsv1_2+`). Off by default because of this: over
    /// TLS 1.3 tokio-xmpp 6 binds SCRAM to the channel (`tls-exporter`) and so asks for
    /// SCRAM-SHA-1-PLUS, which Prosody 0.12 offers only over TLS 1.2 (`tls-unique`); it then
    /// falls back to PLAIN, or finds no mechanism if PLAIN is disabled. Over TLS 1.2 it uses
    /// SCRAM-SHA-1 without channel binding.
    pub fn allow_tls13(mut self) -> Self {
        self.tls13 = true;
        self
    }

    /// Offer (`true`) or not (`false`) the PLAIN mechanism. Default: offered in plaintext
    /// mode, not offered in TLS mode (so a STARTTLS login is SCRAM-SHA-1 or nothing).
    pub fn sasl_plain(mut self, offered: bool) -> Self {
        self.plain = Some(offered);
        self
    }

    /// The XEP-0114 components (full JIDs), replacing the default two
    /// (`pubsub.user-agents.DOMAIN`, `commands.auth.DOMAIN`). An empty list means none.
    pub fn components<S: AsRef<str>>(mut self, components: &[S]) -> Self {
        self.components = Some(components.iter().map(|c| c.as_ref().to_string()).collect());
        self
    }

    /// The shared secret of all components.
    pub fn component_secret(mut self, secret: &str) -> Self {
        self.component_secret = secret.to_string();
        self
    }

    /// Adds Prosody's own XEP-0060 service as `Component "<jid>" "pubsub"` (for interop checks).
    pub fn native_pubsub(mut self, jid: &str) -> Self {
        self.native_pubsub = Some(jid.to_string());
        self
    }

    /// Adds modules to `modules_enabled` (e.g. `"smacks"`, `"carbons"`).
    pub fn module(mut self, module: &str) -> Self {
        self.extra_modules.push(module.to_string());
        self
    }

    /// Lua lines appended to the global section of the config.
    pub fn global_config(mut self, lua: &str) -> Self {
        self.extra_global_config.push_str(lua);
        self.extra_global_config.push('\n');
        self
    }

    /// Lua lines appended to the `VirtualHost` section.
    pub fn host_config(mut self, lua: &str) -> Self {
        self.extra_host_config.push_str(lua);
        self.extra_host_config.push('\n');
        self
    }

    /// A user to register before the server starts.
    pub fn user(mut self, user: &str, password: &str) -> Self {
        self.users.push((user.to_string(), password.to_string()));
        self
    }

    /// The minimum log level written to the log file (default `debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Starts the server and waits until it serves both ports. Panics (with the log tail) if
    /// it does not within [`START_DEADLINE`].
    pub fn start(self) -> Prosody {
        let prosody_bin = find_binary("PROSODY_BIN", "prosody");
        let prosodyctl_bin = find_binary("PROSODYCTL_BIN", "prosodyctl");
        let dir = server_dir("prosody-test-");
        let path = dir.path().to_path_buf();
        for sub in ["data", "certs"] {
            std::fs::create_dir_all(path.join(sub)).expect("create the Prosody directories");
        }
        let components = self
            .components
            .clone()
            .unwrap_or_else(|| default_components(&self.domain));
        let names = vec![
            self.domain.clone(),
            format!("*.{}", self.domain),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ];
        let (cert_path, key_path) =
            test_ca().issue_server_cert(&names, &path.join("certs"), &self.domain);
        let mut prosody = Prosody {
            config_path: path.join("prosody.cfg.lua"),
            log_path: path.join("prosody.log"),
            output_path: path.join("prosody.out"),
            ca_cert_path: test_ca().cert_path().to_path_buf(),
            cert_path,
            key_path,
            components,
            prosody_bin,
            prosodyctl_bin,
            c2s_port: 0,
            component_port: 0,
            server: None,
            options: self,
            dir,
        };
        let mut last_err = String::new();
        for attempt in 1..=5 {
            prosody.c2s_port = free_port();
            prosody.component_port = free_port();
            prosody.write_config();
            if attempt == 1 {
                let users = prosody.options.users.clone();
                for (user, password) in &users {
                    prosody.register(user, password);
                }
            }
            match prosody.spawn_and_wait() {
                Ok(()) => return prosody,
                Err(StartError::PortTaken(msg)) => {
                    last_err = msg;
                    eprintln!("prosody: a port was taken ({last_err}); retrying with new ports");
                }
                Err(StartError::Failed(msg)) => prosody.fail_start(&msg),
            }
        }
        prosody.fail_start(&format!("ports kept being taken: {last_err}"))
    }
}

enum StartError {
    PortTaken(String),
    Failed(String),
}

// ---------------------------------------------------------------------------------------------
// Prosody
// ---------------------------------------------------------------------------------------------

/// A running (or stopped, after [`Prosody::stop`]) Prosody. Killed on drop.
pub struct Prosody {
    options: ProsodyBuilder,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    output_path: PathBuf,
    ca_cert_path: PathBuf,
    cert_path: PathBuf,
    key_path: PathBuf,
    components: Vec<String>,
    prosody_bin: PathBuf,
    prosodyctl_bin: PathBuf,
    c2s_port: u16,
    component_port: u16,
    server: Option<ChildServer>,
}

fn lua_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path_str(p: &Path) -> String {
    lua_str(&p.display().to_string())
}

impl Prosody {
    /// The default: STARTTLS required with the test CA, domain `example.test`, the two default
    /// components with [`DEFAULT_COMPONENT_SECRET`].
    pub fn start() -> Self {
        ProsodyBuilder::default().start()
    }

    /// Like [`Prosody::start`] but plaintext c2s allowed (PLAIN and SCRAM over TCP).
    pub fn start_plaintext() -> Self {
        ProsodyBuilder::default().plaintext().start()
    }

    /// Options to start one with.
    pub fn builder() -> ProsodyBuilder {
        ProsodyBuilder::default()
    }

    /// The client-to-server address (127.0.0.1:port).
    pub fn c2s_addr(&self) -> SocketAddr {
        loopback(self.c2s_port)
    }

    /// The c2s port.
    pub fn c2s_port(&self) -> u16 {
        self.c2s_port
    }

    /// The XEP-0114 component address (127.0.0.1:port).
    pub fn component_addr(&self) -> SocketAddr {
        loopback(self.component_port)
    }

    /// The component port.
    pub fn component_port(&self) -> u16 {
        self.component_port
    }

    /// The VirtualHost.
    pub fn domain(&self) -> &str {
        &self.options.domain
    }

    /// `user@domain`.
    pub fn jid(&self, user: &str) -> String {
        format!("{user}@{}", self.options.domain)
    }

    /// The components' shared secret.
    pub fn component_secret(&self) -> &str {
        &self.options.component_secret
    }

    /// The configured XEP-0114 component JIDs.
    pub fn components(&self) -> &[String] {
        &self.components
    }

    /// Whether c2s requires STARTTLS.
    pub fn tls_required(&self) -> bool {
        self.options.tls_required
    }

    /// The test CA certificate that signed the server certificate (see [`trust_test_ca`]).
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    /// The server certificate (leaf then CA) and key.
    pub fn server_cert_paths(&self) -> (&Path, &Path) {
        (&self.cert_path, &self.key_path)
    }

    /// Prosody's log file (debug level by default).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory holding config, data, certificates and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(ChildServer::pid)
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.server.as_mut().is_some_and(ChildServer::is_running)
    }

    /// Registers `user@domain` with `password` (`prosodyctl register`); works while the server
    /// runs or not. Panics if prosodyctl fails.
    pub fn register(&self, user: &str, password: &str) {
        self.prosodyctl(&["register", user, &self.options.domain, password]);
    }

    /// Deletes `user@domain` (`prosodyctl deluser`).
    pub fn unregister(&self, user: &str) {
        self.prosodyctl(&["deluser", &self.jid(user)]);
    }

    /// Runs `prosodyctl --config CONFIG ARGS...` and returns its output; panics on failure.
    pub fn prosodyctl(&self, args: &[&str]) -> String {
        let output = Command::new(&self.prosodyctl_bin)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.prosodyctl_bin.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "prosodyctl {args:?} failed ({}):\n{text}",
            output.status
        );
        text
    }

    /// Stops the server gracefully (SIGTERM, SIGKILL after [`STOP_GRACE`]) and waits until the
    /// process is gone. Returns how long that took. Ports and data are kept for [`start_again`].
    ///
    /// [`start_again`]: Prosody::start_again
    pub fn stop(&mut self) -> Duration {
        match self.server.take() {
            Some(mut server) => server.terminate(STOP_GRACE),
            None => Duration::ZERO,
        }
    }

    /// Kills the server (SIGKILL: a crash, no stream close sent) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    /// Starts a stopped server again, on the same ports with the same data (users kept).
    /// Panics if it is running, or if it does not come up.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "prosody is already running");
        self.server = None;
        match self.spawn_and_wait() {
            Ok(()) => {}
            Err(StartError::PortTaken(msg)) => {
                self.fail_start(&format!("cannot get its ports back: {msg}"))
            }
            Err(StartError::Failed(msg)) => self.fail_start(&msg),
        }
    }

    /// [`stop`](Prosody::stop) then [`start_again`](Prosody::start_again): the same ports serve
    /// again, for reconnect tests.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    fn write_config(&self) {
        let o = &self.options;
        let dir = self.dir.path();
        let mut modules: Vec<String> = ["roster", "saslauth", "tls", "disco", "ping", "posix"]
            .iter()
            .map(|m| m.to_string())
            .collect();
        for m in &o.extra_modules {
            if !modules.contains(m) {
                modules.push(m.clone());
            }
        }
        let modules = modules
            .iter()
            .map(|m| lua_str(m))
            .collect::<Vec<_>>()
            .join("; ");
        let mut cfg = String::new();
        let _ = writeln!(cfg, "-- Generated by tests/common/prosody.rs for one test.");
        let _ = writeln!(cfg, "run_as_root = true");
        let _ = writeln!(cfg, "daemonize = false");
        let _ = writeln!(cfg, "data_path = {}", path_str(&dir.join("data")));
        let _ = writeln!(cfg, "pidfile = {}", path_str(&dir.join("prosody.pid")));
        let _ = writeln!(cfg, "certificates = {}", path_str(&dir.join("certs")));
        let _ = writeln!(
            cfg,
            "log = {{ {{ levels = {{ min = {} }}; to = \"file\"; filename = {} }} }}",
            lua_str(&o.log_level),
            path_str(&self.log_path)
        );
        let _ = writeln!(cfg, "interfaces = {{ \"127.0.0.1\" }}");
        let _ = writeln!(cfg, "local_interfaces = {{ \"127.0.0.1\" }}");
        let _ = writeln!(cfg, "c2s_ports = {{ {} }}", self.c2s_port);
        let _ = writeln!(cfg, "c2s_interfaces = {{ \"127.0.0.1\" }}");
        let _ = writeln!(cfg, "c2s_direct_tls_ports = {{}}");
        let _ = writeln!(cfg, "legacy_ssl_ports = {{}}");
        let _ = writeln!(cfg, "component_ports = {{ {} }}", self.component_port);
        let _ = writeln!(cfg, "component_interfaces = {{ \"127.0.0.1\" }}");
        let _ = writeln!(cfg, "s2s_ports = {{}}");
        let _ = writeln!(cfg, "s2s_direct_tls_ports = {{}}");
        let _ = writeln!(cfg, "http_ports = {{}}");
        let _ = writeln!(cfg, "https_ports = {{}}");
        let _ = writeln!(cfg, "modules_enabled = {{ {modules} }}");
        let _ = writeln!(cfg, "modules_disabled = {{ \"s2s\"; \"offline\" }}");
        let _ = writeln!(cfg, "authentication = \"internal_hashed\"");
        let _ = writeln!(cfg, "storage = \"internal\"");
        let _ = writeln!(cfg, "allow_registration = false");
        let _ = writeln!(cfg, "c2s_require_encryption = {}", o.tls_required);
        let _ = writeln!(cfg, "s2s_require_encryption = false");
        let _ = writeln!(cfg, "allow_unencrypted_plain_auth = {}", !o.tls_required);
        let plain = o.plain.unwrap_or(!o.tls_required);
        let _ = writeln!(
            cfg,
            "disable_sasl_mechanisms = {{ \"DIGEST-MD5\"{} }}",
            if plain { "" } else { "; \"PLAIN\"" }
        );
        let _ = writeln!(
            cfg,
            "ssl = {{ certificate = {}; key = {}; protocol = {} }}",
            path_str(&self.cert_path),
            path_str(&self.key_path),
            if o.tls13 {
                "\"tlsv1_2+\""
            } else {
                "\"tlsv1_2\""
            }
        );
        cfg.push_str(&o.extra_global_config);
        let _ = writeln!(cfg, "\nVirtualHost {}", lua_str(&o.domain));
        cfg.push_str(&o.extra_host_config);
        for component in &self.components {
            let _ = writeln!(cfg, "\nComponent {}", lua_str(component));
            let _ = writeln!(
                cfg,
                "    component_secret = {}",
                lua_str(&o.component_secret)
            );
        }
        if let Some(pubsub) = &o.native_pubsub {
            let _ = writeln!(cfg, "\nComponent {} \"pubsub\"", lua_str(pubsub));
        }
        std::fs::write(&self.config_path, cfg).expect("write the Prosody config");
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The log written since byte `from`.
    fn log_since(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            use std::io::Seek;
            if f.seek(std::io::SeekFrom::Start(from)).is_ok() {
                let mut bytes = Vec::new();
                let _ = f.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        text
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log_start = self.log_len();
        let mut cmd = Command::new(&self.prosody_bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("-F")
            .current_dir(self.dir.path());
        let started = Instant::now();
        self.server = Some(ChildServer::spawn(
            "prosody",
            cmd,
            &self.output_path,
            std::slice::from_ref(&self.log_path),
        ));
        let want: HashSet<u16> = [self.c2s_port, self.component_port].into_iter().collect();
        let result = poll_until(START_DEADLINE, || {
            let log = self.log_since(log_start);
            if let Some(line) = log
                .lines()
                .find(|l| l.contains("Failed to open server port"))
            {
                return Some(Err(StartError::PortTaken(line.to_string())));
            }
            let server = self.server.as_mut().expect("server spawned above");
            if !server.is_running() {
                return Some(Err(StartError::Failed(format!(
                    "exited during start-up: {:?}",
                    server.exit_status()
                ))));
            }
            let pid = server.pid()?;
            let listening = super::wait::listening_ports(pid);
            if want.is_subset(&listening) {
                Some(Ok(()))
            } else {
                None
            }
        });
        match result {
            None => {
                return Err(StartError::Failed(format!(
                    "not listening on c2s {} and component {} after {START_DEADLINE:?}",
                    self.c2s_port, self.component_port
                )))
            }
            Some(Err(e)) => {
                self.kill();
                return Err(e);
            }
            Some(Ok(())) => {}
        }
        if let Err(msg) = self.check_c2s_greeting() {
            return Err(StartError::Failed(msg));
        }
        if std::env::var_os("ONSIP_TEST_VERBOSE").is_some() {
            eprintln!(
                "prosody up on c2s {} / component {} in {:?}",
                self.c2s_port,
                self.component_port,
                started.elapsed()
            );
        }
        Ok(())
    }

    /// Opens a c2s stream and checks that the domain answers with stream features.
    fn check_c2s_greeting(&self) -> Result<(), String> {
        let mut stream = TcpStream::connect_timeout(&self.c2s_addr(), Duration::from_secs(2))
            .map_err(|e| format!("connect to c2s {}: {e}", self.c2s_addr()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let header = format!(
            "<?xml version='1.0'?><stream:stream to='{}' version='1.0' xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams'>",
            self.options.domain
        );
        stream
            .write_all(header.as_bytes())
            .map_err(|e| format!("write a stream header to c2s: {e}"))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("</stream:features>") {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    return Err(format!(
                        "reading the c2s greeting: {e}; got {:?}",
                        String::from_utf8_lossy(&got)
                    ))
                }
            }
        }
        let _ = stream.write_all(b"</stream:stream>");
        let text = String::from_utf8_lossy(&got);
        let starttls = text.contains("urn:ietf:params:xml:ns:xmpp-tls");
        if !text.contains("</stream:features>") || !starttls {
            return Err(format!(
                "c2s greeting has no stream features with STARTTLS: {text:?}"
            ));
        }
        Ok(())
    }

    fn fail_start(&mut self, msg: &str) -> ! {
        let output = tail(&self.output_path, 20);
        let log = self.log_tail(60);
        self.kill();
        panic!(
            "prosody did not start: {msg}\nconfig {}:\n{}\n--- {} ---\n{output}\n--- {} ---\n{log}",
            self.config_path.display(),
            std::fs::read_to_string(&self.config_path).unwrap_or_default(),
            self.output_path.display(),
            self.log_path.display(),
        );
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        // ChildServer's drop prints the log tails if the test is failing, then SIGKILLs.
        self.server.take();
    }
}
