//! A loopback TCP proxy that can go silent: it stops forwarding on the
//! connections it holds without closing them, the way a dead NAT entry or a
//! half-broken link behaves. New connections are forwarded normally.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct SilentProxy {
    pub addr: SocketAddr,
    /// Connections opened after this generation are live; older ones are frozen.
    frozen_before: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    pub accepted: Arc<AtomicU64>,
    cancel: CancellationToken,
    _running: Arc<AtomicBool>,
}

impl SilentProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let frozen_before = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (fb, gen, acc, stop) = (
            frozen_before.clone(),
            generation.clone(),
            accepted.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    () = stop.cancelled() => return,
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let my_generation = gen.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (fb, stop) = (fb.clone(), stop.clone());
                tokio::spawn(pipe(client, server, my_generation, fb, stop));
            }
        });
        Self {
            addr,
            frozen_before,
            generation,
            accepted,
            cancel,
            _running: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Every connection open now stops forwarding (stays open, silent).
    pub fn freeze_current(&self) {
        self.frozen_before
            .store(self.generation.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    generation: u64,
    frozen_before: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let frozen = move || generation < frozen_before.load(Ordering::SeqCst);
    let f2 = frozen.clone();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen() {
                // Swallow everything, answer nothing, close nothing.
                std::future::pending::<()>().await;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if f2() {
                std::future::pending::<()>().await;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = async { tokio::join!(up, down); } => {}
        () = stop.cancelled() => {}
    }
}
