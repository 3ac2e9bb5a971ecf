//! Logging: tracing to stderr as logfmt or JSON, at `--log.level` unless
//! `RUST_LOG` says otherwise.
//!
//! Whatever the level, tokio-xmpp's stream tracing is dropped: it dumps every
//! stanza sent and received (`SEND <auth mechanism='PLAIN'>…`), which
//! carries the SASL PLAIN message (base64 of the XMPP password) and the
//! `authorize-plain` command with the OnSIP password in clear.

use tracing::{Level, Metadata};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Whether a log line may be written at all: false for the XMPP stack's
/// stanza dumps (see the module doc), whatever `RUST_LOG` asks for.
pub fn may_log(meta: &Metadata<'_>) -> bool {
    !(*meta.level() == Level::TRACE && meta.target().starts_with("tokio_xmpp::xmlstream"))
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Our crates at the chosen level; the XMPP stack only for warnings,
        // since its debug output is per stanza.
        EnvFilter::new(format!("warn,onsip_ua_exporter={level},onsip_sim={level}"))
    });
    // A global filter (consulted before a `log` record is even formatted:
    // tokio-xmpp then does not capture stanza text at all).
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(may_log));
    let result = match format {
        LogFormat::Logfmt => registry
            .with(
                tracing_logfmt::builder()
                    .layer()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // Already installed (tests start several exporters in one process).
    if result.is_ok() {
        tracing::trace!(
            "trace logging on; XMPP stanza dumps are withheld (they carry the passwords)"
        );
    }
}
