//! Waiting with deadlines, free loopback ports, finding server binaries, and the child-process
//! handling that the Prosody and Prometheus helpers share.
//!
//! Nothing here sleeps for a fixed time to "let things settle": every wait polls a condition
//! until a deadline and panics with a message naming what it waited for.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the `eventually*` helpers poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value.
///
/// Panics with `what` if `deadline` (counted from the call) passes first. `f` is always called
/// at least once, and once more right at the deadline.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = f().await {
            return value;
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - elapsed)).await;
    }
}

/// The blocking twin of [`eventually`], for sync code (or inside `spawn_blocking`).
pub fn eventually_blocking<T, F>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Option<T>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - elapsed));
    }
}

/// Like [`eventually_blocking`] but returns `None` on timeout instead of panicking, so the
/// caller can add context (a server's log, say) to its own panic.
pub fn poll_until<T, F>(deadline: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Option<T>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - elapsed));
    }
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// Ports are drawn from here: below Linux's ephemeral range (32768–60999), so an outgoing
/// connection of this or another process never holds one, and above the usual service ports.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// Ports this process already handed out: never handed out twice, even after release.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.finish()
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server in another process.
///
/// Picked at random in 20000–31999 (outside the ephemeral range), checked by binding it, and
/// never returned twice by one process. Another process could still take it before the server
/// binds it; the server helpers detect that and retry with new ports. For a server in this
/// process, prefer [`bound_listener`], which has no such race.
pub fn free_port() -> u16 {
    let span = u64::from(PORT_RANGE.end - PORT_RANGE.start);
    for _ in 0..1000 {
        let port = PORT_RANGE.start + (random_u64() % span) as u16;
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let handed_out = guard.get_or_insert_with(HashSet::new);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in {PORT_RANGE:?} after 1000 tries");
}

/// A std listener bound to 127.0.0.1 on a port the kernel chose: race-free for servers that run
/// in this process (turn it into a tokio one with `set_nonblocking(true)` and
/// `tokio::net::TcpListener::from_std`).
pub fn bound_listener() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener on 127.0.0.1:0")
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn port_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The TCP ports process `pid` listens on (IPv4 and IPv6), from /proc: proof that a server
/// we started holds its ports, where a connect test could reach another process.
pub fn listening_ports(pid: u32) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            if fields.len() < 10 || fields[3] != "0A" || !inodes.contains(fields[9]) {
                continue;
            }
            if let Some(port) = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// The path of a server binary: `$env_var` if set (scripts/test.sh exports them), else `name`
/// looked up on PATH. Panics (the test fails, never skips) when it is not there.
pub fn find_binary(env_var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env_var}={} is not a file: install {name} (scripts/test.sh does) or fix {env_var}",
            path.display()
        );
        return path;
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path_var) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` not found on PATH and {env_var} is not set: the integration tests need it. \
         Run scripts/test.sh (it installs it) or set {env_var}."
    );
}

// ---------------------------------------------------------------------------------------------
// Child server processes
// ---------------------------------------------------------------------------------------------

/// The last `lines` lines of a text file, or a note saying why there are none.
pub fn tail(path: &Path, lines: usize) -> String {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    // Read at most the last 64 KiB: enough for `lines` lines of a server log.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return format!("(cannot seek in {})", path.display());
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.read_to_end(&mut bytes) {
        return format!("(cannot read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    if all.is_empty() {
        return format!("({} is empty)", path.display());
    }
    all[from..].join("\n")
}

/// A server running as a child of the test process, with its output in a file.
///
/// Stopped on drop (SIGKILL, then reaped: no zombie is left). If the thread is panicking — a
/// failed test — the drop prints the tail of the server's logs to stderr first.
pub struct ChildServer {
    name: String,
    child: Option<Child>,
    logs: Vec<PathBuf>,
    exit: Option<ExitStatus>,
}

impl ChildServer {
    /// Spawns `cmd` with stdin closed and stdout and stderr appended to `output_log`.
    /// `extra_logs` are other log files worth printing when something fails.
    pub fn spawn(name: &str, mut cmd: Command, output_log: &Path, extra_logs: &[PathBuf]) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(output_log)
            .unwrap_or_else(|e| panic!("open {} for {name}: {e}", output_log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup log file handle for {name}: {e}"));
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        let mut logs = vec![output_log.to_path_buf()];
        logs.extend(extra_logs.iter().cloned());
        Self {
            name: name.to_string(),
            child: Some(child),
            logs,
            exit: None,
        }
    }

    /// The process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.exit = Some(status);
                self.child = None;
                false
            }
            Err(e) => panic!("wait for {}: {e}", self.name),
        }
    }

    /// How the process exited, once it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.exit
    }

    /// Sends SIGTERM, waits up to `grace` for the process to exit, then SIGKILLs it.
    /// Returns how long the process took to go.
    pub fn terminate(&mut self, grace: Duration) -> Duration {
        let start = Instant::now();
        let Some(pid) = self.pid() else {
            return Duration::ZERO;
        };
        if self.is_running() {
            // Through sh's builtin kill: no libc dependency, and no reliance on procps.
            let _ = Command::new("sh")
                .args([
                    "-c",
                    "kill -TERM \"$1\" 2>/dev/null",
                    "sh",
                    &pid.to_string(),
                ])
                .status();
            if poll_until(grace, || (!self.is_running()).then_some(())).is_none() {
                eprintln!(
                    "{} (pid {pid}) still running {grace:?} after SIGTERM: killing it",
                    self.name
                );
                self.kill();
            }
        }
        start.elapsed()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            match child.wait() {
                Ok(status) => self.exit = Some(status),
                Err(e) => eprintln!("wait for {} after SIGKILL: {e}", self.name),
            }
        }
    }

    /// The tails of the server's logs, for a panic message.
    pub fn log_tails(&self, lines: usize) -> String {
        self.logs
            .iter()
            .map(|p| {
                format!(
                    "--- last lines of {} ---\n{}\n",
                    p.display(),
                    tail(p, lines)
                )
            })
            .collect()
    }

    /// Panics with `msg` and the tails of the server's logs.
    pub fn fail(&self, msg: &str) -> ! {
        panic!("{}: {msg}\n{}", self.name, self.log_tails(40));
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} logs (the test is failing):\n{}",
                self.name,
                self.log_tails(40)
            );
        }
        self.kill();
    }
}

/// Keep a test's server directories for a post-mortem: set `ONSIP_TEST_KEEP_DIRS=1`.
pub fn keep_dirs() -> bool {
    std::env::var_os("ONSIP_TEST_KEEP_DIRS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A fresh temporary directory for a server, kept after the test if [`keep_dirs`].
pub fn server_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .disable_cleanup(keep_dirs())
        .tempdir()
        .expect("create a temporary directory");
    if keep_dirs() {
        eprintln!("keeping {}", dir.path().display());
    }
    dir
}

/// The loopback address with `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}
