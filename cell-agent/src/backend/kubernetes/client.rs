//! The API-server client: kube-rs with a client-side rate limit (QPS and burst, like
//! client-go's, with defaults fit for CI), and the meter of the agent's own pod-create rate
//! that becomes the cell's reported `api_budget`.

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::config::KubeConfig;

/// A tower layer that holds each request until the rate limiter lets it through.
#[derive(Clone, Debug)]
pub struct ThrottleLayer {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl ThrottleLayer {
    /// `qps` sustained requests per second with bursts of `burst` (both at least 1).
    pub fn new(qps: u32, burst: u32) -> Self {
        let qps = NonZeroU32::new(qps.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(burst.max(qps.get())).expect("at least 1");
        Self {
            limiter: Arc::new(RateLimiter::direct(
                Quota::per_second(qps).allow_burst(burst),
            )),
        }
    }
}

impl<S> Layer<S> for ThrottleLayer {
    type Service = Throttle<S>;

    fn layer(&self, inner: S) -> Throttle<S> {
        Throttle {
            inner,
            limiter: self.limiter.clone(),
            permit: None,
            waiting: None,
        }
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The service [`ThrottleLayer`] makes: not ready until the limiter grants a permit, so
/// callers (kube's buffer) queue instead of the API server throttling them with 429s.
pub struct Throttle<S> {
    inner: S,
    limiter: Arc<DefaultDirectRateLimiter>,
    permit: Option<()>,
    waiting: Option<Wait>,
}

impl<S> std::fmt::Debug for Throttle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req> Service<Req> for Throttle<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() {
            if self.waiting.is_none() {
                if self.limiter.check().is_ok() {
                    self.permit = Some(());
                } else {
                    let limiter = self.limiter.clone();
                    self.waiting = Some(Box::pin(async move { limiter.until_ready().await }));
                }
            }
            if let Some(wait) = &mut self.waiting {
                match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.waiting = None;
                        self.permit = Some(());
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // tower's contract: `call` only after `poll_ready` said ready, which took a permit.
        self.permit = None;
        self.inner.call(req)
    }
}

/// Connects to the cluster the agent runs in (in-cluster service account, or `KUBECONFIG`
/// and `~/.kube/config` elsewhere), throttled per `cfg`.
pub async fn connect(cfg: &KubeConfig) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder
        .with_layer(&ThrottleLayer::new(cfg.qps, cfg.burst))
        .build())
}

/// Counts pod creations over a sliding window, to report the cell's remaining budget.
#[derive(Debug)]
pub struct CreateMeter {
    window: Duration,
    creates: Mutex<VecDeque<Instant>>,
}

impl CreateMeter {
    /// A meter over the last `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            creates: Mutex::default(),
        }
    }

    /// One pod creation happened now.
    pub fn record(&self) {
        let now = Instant::now();
        let mut creates = self.creates.lock().unwrap_or_else(|p| p.into_inner());
        creates.push_back(now);
        Self::expire(&mut creates, now, self.window);
    }

    /// Pod creations per second over the window.
    pub fn rate(&self) -> f64 {
        let now = Instant::now();
        let mut creates = self.creates.lock().unwrap_or_else(|p| p.into_inner());
        Self::expire(&mut creates, now, self.window);
        creates.len() as f64 / self.window.as_secs_f64()
    }

    /// What is left of `budget` creations per second, at least 1: a cell at its budget
    /// still takes work slowly rather than none (0 on the wire means "no limit reported").
    pub fn remaining(&self, budget: u32) -> u32 {
        let used = self.rate().ceil() as u32;
        budget.saturating_sub(used).max(1)
    }

    fn expire(creates: &mut VecDeque<Instant>, now: Instant, window: Duration) {
        while creates
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            creates.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_left_shrinks_with_the_measured_create_rate_and_recovers() {
        let meter = CreateMeter::new(Duration::from_secs(10));
        assert_eq!(meter.remaining(20), 20);
        for _ in 0..100 {
            meter.record();
        }
        assert_eq!(meter.rate(), 10.0);
        assert_eq!(meter.remaining(20), 10);
        for _ in 0..200 {
            meter.record();
        }
        assert_eq!(meter.remaining(20), 1, "never reported as 0 (= no limit)");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(meter.remaining(20), 20);
    }

    #[tokio::test]
    async fn the_throttle_lets_a_burst_through_then_holds_requests_to_the_rate() {
        use tower::ServiceExt as _;
        let svc = tower::service_fn(|n: u32| async move { Ok::<_, std::convert::Infallible>(n) });
        let mut svc = ThrottleLayer::new(10, 10).layer(svc);
        let start = Instant::now();
        for n in 0..10 {
            assert_eq!(svc.ready().await.expect("ready").call(n).await, Ok(n));
        }
        let burst = start.elapsed();
        for n in 0..3 {
            svc.ready().await.expect("ready").call(n).await.expect("ok");
        }
        let after = start.elapsed();
        assert!(
            burst < Duration::from_millis(50),
            "the burst waited: {burst:?}"
        );
        // Three more at 10/s take about 300 ms.
        assert!(
            after >= Duration::from_millis(250),
            "requests past the burst were not held back: {after:?}"
        );
    }
}
