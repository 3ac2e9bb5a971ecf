//! Wiring: start the HTTP server, the OnSIP session and the expiry sweep
//! under one cancellation token, and stop them in order. No logic of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::http::{self, HttpContext};
use crate::metrics::{BuildInfo, Metrics};
use crate::persist;
use crate::session;
use crate::state::{Shared, State};

/// The version and revision this binary was built from.
pub const BUILD: BuildInfo = BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    revision: match option_env!("ONSIP_BUILD_REVISION") {
        Some(revision) => revision,
        None => "unknown",
    },
};

/// How often stale registrations are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A running exporter.
pub struct Exporter {
    /// Where HTTP is served (useful when the configured port was 0).
    pub local_addr: SocketAddr,
    pub shared: Shared,
    task: JoinHandle<()>,
}

impl Exporter {
    /// Waits until the exporter has stopped (after its token was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// Binds the listen address and starts everything. Errors are start-up
/// problems (address in use, unreadable CA file) and name the flag.
pub async fn start(config: Config, cancel: CancellationToken) -> Result<Exporter, String> {
    let config = Arc::new(config);
    // Build the TLS trust store now so a bad CA file fails at start-up.
    if let crate::config::Transport::StartTls { ca_file, .. } = &config.xmpp.transport {
        crate::xmpp::tls_config(ca_file.as_deref())?;
    }
    let listener = http::bind(config.listen_address).await?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let shared: Shared = Arc::new(Mutex::new(State::new(
        config.limits.clone(),
        &config.onsip.nodes,
    )));
    shared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .fleet
        .set_watched(&config.onsip.watch);
    let writes_allowed = match &config.state_file {
        Some(path) => load_state(path, &shared),
        None => false,
    };
    let ctx = Arc::new(HttpContext {
        metrics: Metrics::new(shared.clone(), config.per_address_metrics, BUILD),
        shared: shared.clone(),
        telemetry_path: config.telemetry_path.clone(),
        version: BUILD.version,
        ready: AtomicBool::new(true),
        web: http::WebSecurity::new(config.web_config.clone()),
    });
    info!(address = %local_addr, telemetry_path = %config.telemetry_path, "serving HTTP");

    let http_cancel = CancellationToken::new();
    let session_cancel = cancel.child_token();
    let http_task = tokio::spawn(http::serve(
        listener,
        ctx.clone(),
        http_cancel.clone(),
        Duration::from_secs(5),
    ));
    let session_task = tokio::spawn(session::run(config.clone(), shared.clone(), session_cancel));
    let sweep_task = tokio::spawn(sweep(shared.clone(), cancel.clone()));
    // Its own token: the last write comes after the session has stopped.
    let persist_cancel = CancellationToken::new();
    let persist_task = match (&config.state_file, writes_allowed) {
        (Some(path), true) => Some(tokio::spawn(persist_loop(
            path.clone(),
            config.state_write_interval,
            shared.clone(),
            persist_cancel.clone(),
        ))),
        _ => None,
    };

    let task = tokio::spawn(async move {
        cancel.cancelled().await;
        // Order: stop being ready, unsubscribe and close XMPP, then drain HTTP.
        ctx.ready.store(false, Ordering::Relaxed);
        let _ = session_task.await;
        let _ = sweep_task.await;
        // After the session: the last events are in, write them.
        persist_cancel.cancel();
        if let Some(task) = persist_task {
            let _ = task.await;
        }
        http_cancel.cancel();
        let _ = http_task.await;
        info!("stopped");
    });
    Ok(Exporter {
        local_addr,
        shared,
        task,
    })
}

/// Drops registrations that expired (plus grace) without a retract.
async fn sweep(shared: Shared, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let dropped = shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expire(session::unix_now());
        if dropped > 0 {
            info!(
                devices = dropped,
                "dropped registrations that expired without a retract"
            );
        }
    }
}

/// Loads the state file into `shared`. Returns whether the file may be
/// written: not when it exists but could neither be read nor moved aside
/// (we never overwrite a file we could not read).
fn load_state(path: &std::path::Path, shared: &Shared) -> bool {
    let now = session::unix_now();
    let (loaded, writable) = match persist::read(path) {
        Ok(None) => {
            info!(path = %path.display(), "no state file yet; starting empty");
            (Ok(0), true)
        }
        Ok(Some(file)) => {
            let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
            let restored = persist::restore(file, &mut state.fleet, now);
            drop(state);
            info!(
                path = %path.display(),
                addresses = restored.addresses,
                devices = restored.devices,
                expired = restored.expired,
                "state file loaded"
            );
            (Ok(restored.devices), true)
        }
        Err(err) => {
            let moved = match &err {
                persist::LoadError::Read { .. } => None,
                _ => persist::move_aside(path).ok(),
            };
            warn!(
                cause = %err,
                moved_to = ?moved.as_ref().map(|p| p.display().to_string()),
                "state file ignored; starting empty"
            );
            (Err(err.to_string()), moved.is_some())
        }
    };
    let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
    state.persist.enabled = true;
    state.persist.loaded = Some(loaded);
    writable
}

/// Writes the state file at most every `interval` when something changed,
/// and once more when cancelled.
async fn persist_loop(
    path: PathBuf,
    interval: Duration,
    shared: Shared,
    cancel: CancellationToken,
) {
    let mut written = None;
    loop {
        let stopping = tokio::select! {
            () = tokio::time::sleep(interval) => false,
            () = cancel.cancelled() => true,
        };
        written = write_state(&path, &shared, written).await;
        if stopping {
            return;
        }
    }
}

/// Writes if the fleet changed since generation `written`; returns the
/// generation now on disk.
async fn write_state(path: &std::path::Path, shared: &Shared, written: Option<u64>) -> Option<u64> {
    let (generation, file) = {
        let state = shared.lock().unwrap_or_else(|p| p.into_inner());
        let generation = state.fleet.generation();
        if written == Some(generation) {
            return written;
        }
        (
            generation,
            persist::capture(&state.fleet, session::unix_now()),
        )
    };
    let target = path.to_owned();
    let result = tokio::task::spawn_blocking(move || persist::write_atomic(&target, &file)).await;
    let now = session::unix_now();
    let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(Ok(())) => {
            state.persist.writes += 1;
            state.persist.last_write = Some(now);
            Some(generation)
        }
        Ok(Err(err)) => {
            state.persist.write_errors += 1;
            drop(state);
            warn!(path = %path.display(), cause = %err, "writing the state file failed");
            written
        }
        Err(err) => {
            state.persist.write_errors += 1;
            drop(state);
            warn!(cause = %err, "state file writer panicked");
            written
        }
    }
}
