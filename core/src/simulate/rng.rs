//! A small seeded random number generator (SplitMix64) and the few distributions the
//! workloads draw from. Written here rather than taken from `rand` so `core` keeps its short
//! dependency list and the stream is pinned: the same seed gives the same day on every
//! platform and every version of any crate.

/// SplitMix64 (Steele, Lea and Flood, 2014): 64 bits of state, passes BigCrush, and any seed
/// (0 included) is a good one.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// An independent stream for `label` (a day, a purpose), so drawing more numbers for one
    /// purpose does not shift another's.
    pub(crate) fn fork(&self, label: u64) -> Rng {
        let mut r = Rng::new(self.state ^ label.wrapping_mul(0xd6e8_feb8_6659_fd93));
        r.next_u64();
        r
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        // The output function the home-cell hashing pins (it adds the increment first).
        let out = crate::placement::splitmix64(self.state);
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out
    }

    /// Uniform in [0, 1), 53 random bits.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi] (inclusive).
    pub(crate) fn range(&mut self, lo: u32, hi: u32) -> u32 {
        let span = u64::from(hi - lo) + 1;
        lo + (self.next_u64() % span) as u32
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponential with mean `mean`.
    pub(crate) fn exp(&mut self, mean: f64) -> f64 {
        // 1 - u is in (0, 1]: ln never sees 0.
        -mean * (1.0 - self.unit()).ln()
    }

    /// Standard normal (Box–Muller; the second value is dropped to keep the stream simple).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Log-normal with median `median` and shape `sigma` (the standard deviation of its log).
    pub(crate) fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_pinned_and_forks_are_independent() {
        let mut r = Rng::new(0);
        // The reference SplitMix64 output for seed 0.
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        let a = Rng::new(7).fork(1).next_u64();
        let b = Rng::new(7).fork(2).next_u64();
        assert_ne!(a, b);
        assert_eq!(a, Rng::new(7).fork(1).next_u64());
    }

    #[test]
    fn draws_have_the_asked_for_centre() {
        let mut r = Rng::new(42);
        let n = 20_000;
        let mean: f64 = (0..n).map(|_| r.exp(3.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 3.0).abs() < 0.1, "{mean}");
        let mut v: Vec<f64> = (0..n).map(|_| r.lognormal(180.0, 0.8)).collect();
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        assert!((median - 180.0).abs() < 8.0, "{median}");
        assert!((0..1000).all(|_| r.range(2, 6) <= 6));
    }
}
