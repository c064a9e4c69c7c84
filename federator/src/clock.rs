//! Time, injected: the federator stamps leader time into commands through a [`Clock`], so
//! tests can control it and `apply` never reads a clock.

/// Wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Now.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(
        clippy::disallowed_methods,
        reason = "the one place production code reads the wall clock"
    )]
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// RFC 3339 with milliseconds, as the API shows times.
pub fn rfc3339(ms: u64) -> String {
    use std::fmt::Write as _;
    // humantime cannot print years past 9999 (its `Display` fails, and `to_string` would
    // panic): clamp, so no stored time can break a response.
    let ms = ms.min(253_402_300_799_000);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let mut out = String::new();
    if write!(out, "{}", humantime::format_rfc3339_millis(t)).is_err() {
        out = format!("@{ms}ms");
    }
    out
}
