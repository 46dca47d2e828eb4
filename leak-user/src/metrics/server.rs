//! The metrics endpoint on the session's tokio runtime: bound before anything is
//! attached (a port in use is a one-line error, not a half-started tracer), one
//! short task per connection, which reads a head, answers and closes.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{CONTENT_TYPE, Metrics, SharedMetrics, http};

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// With `--metrics`: binds `addr` (call before attaching anything) and serves new
/// metrics there; kernel mode gives `sites` call sites their own series.
pub async fn start(
    addr: Option<SocketAddr>,
    sites: usize,
) -> anyhow::Result<Option<SharedMetrics>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics: cannot listen on {addr}: {e}"))?;
    let metrics = Metrics::shared(sites);
    spawn(listener, metrics.clone());
    Ok(Some(metrics))
}

/// Serves `/metrics` from `metrics` until the runtime ends.
fn spawn(listener: TcpListener, metrics: SharedMetrics) {
    if let Ok(addr) = listener.local_addr() {
        log::info!("metrics at http://{addr}/metrics");
    }
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, metrics.clone()));
                }
                Err(err) => {
                    // Out of descriptors and the like: wait rather than spin.
                    log::warn!("metrics: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

async fn serve(mut stream: TcpStream, metrics: SharedMetrics) {
    let mut buf = Vec::with_capacity(1024);
    let route = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(len) = http::head_len(&buf) {
                return http::route(&buf[..len]);
            }
            if buf.len() > http::MAX_HEAD {
                return http::Route::BadRequest;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return http::Route::BadRequest,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or(http::Route::BadRequest);
    let response = http::answer(route, CONTENT_TYPE, || {
        metrics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .render()
    });
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}
