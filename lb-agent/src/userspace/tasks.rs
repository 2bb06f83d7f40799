//! Small waits that every serving task (L4 and gRPC) selects on.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

/// Resolves once `stop` is true or its sender is gone.
pub(crate) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves once nothing was seen for `idle`; never if `idle` is zero.
pub(crate) async fn idle_expired(start: Instant, last: &AtomicU64, idle: Duration) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let seen = Duration::from_millis(last.load(Relaxed));
        let Some(at) = start.checked_add(seen).and_then(|t| t.checked_add(idle)) else {
            return std::future::pending().await;
        };
        if Instant::now() >= at {
            return;
        }
        sleep_until(at).await;
    }
}
