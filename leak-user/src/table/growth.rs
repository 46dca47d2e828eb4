//! Is a call site leaking? Kernel memory cannot be scanned from user space, so the
//! evidence is growth: a site whose outstanding count keeps rising over the
//! observation window is a suspected leak.
//!
//! The tracker keeps each site's outstanding count at every report. A site is
//! suspected when, over the window, a least-squares line through the counts rises
//! (slope > 0) and fits well (R²), the count rose in most steps, the rise is not
//! negligible, and it is still rising in the second half of the window (a cache
//! warming up and then flat is not a leak). How confident we are follows the fit
//! and the number of samples; the reason says why in numbers.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// Samples kept per site.
const WINDOW: usize = 60;
/// Fewer samples than this say nothing.
const MIN_SAMPLES: usize = 5;

/// How sure we are that a site leaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

/// The evidence about one site.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trend {
    /// Objects per second, least squares over the window.
    pub slope_per_s: f64,
    /// Goodness of fit of that line (1: perfectly steady growth).
    pub r2: f64,
    pub samples: usize,
    pub window_s: f64,
    /// Last count minus first count.
    pub net_growth: i64,
    /// Steps in which the count rose or stayed, of all steps.
    pub rising_steps: usize,
    pub steps: usize,
    /// Set when the trend makes the site a suspected leak.
    pub suspected: Option<Confidence>,
}

impl Trend {
    pub fn reason(&self) -> String {
        format!(
            "outstanding count rose by {} in {:.1} s ({:+.1}/s, R² {:.2}, rising in {} of {} steps)",
            self.net_growth,
            self.window_s,
            self.slope_per_s,
            self.r2,
            self.rising_steps,
            self.steps
        )
    }
}

/// Least squares: (slope, R²) of `points`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxx, mut sxy, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in points {
        sxx += (x - mx) * (x - mx);
        sxy += (x - mx) * (y - my);
        syy += (y - my) * (y - my);
    }
    if sxx == 0.0 {
        return (0.0, 0.0);
    }
    let slope = sxy / sxx;
    let r2 = if syy == 0.0 {
        0.0
    } else {
        (sxy * sxy) / (sxx * syy)
    };
    (slope, r2)
}

/// What a trend must show before a site is suspected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evidence {
    /// Objects the site must have gained over the window (and a quarter of that
    /// in its second half).
    pub min_growth: u64,
    /// Seconds the site must have been watched: the kernel's own caches grow in
    /// bursts of a few reports (DAMON's regions, the dentry and extent caches)
    /// and then shrink again; a steady leak keeps growing for minutes. High
    /// confidence needs half as long again.
    pub min_window_s: f64,
}

/// Judges a series of (seconds, outstanding count) samples.
pub fn judge(samples: &[(f64, u64)], evidence: Evidence) -> Option<Trend> {
    let min_growth = evidence.min_growth;
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    let points: Vec<(f64, f64)> = samples.iter().map(|&(t, c)| (t, c as f64)).collect();
    let (slope, r2) = fit(&points);
    let half = &points[points.len() / 2..];
    let (late_slope, _) = fit(half);
    let first = samples[0].1 as i64;
    let last = samples[samples.len() - 1].1 as i64;
    let rising_steps = samples.windows(2).filter(|w| w[1].1 >= w[0].1).count();
    let steps = samples.len() - 1;
    let net = last - first;
    let late_net = half.last().map_or(0.0, |p| p.1) - half.first().map_or(0.0, |p| p.1);
    let window_s = samples[samples.len() - 1].0 - samples[0].0;
    let growing = slope > 0.0
        && window_s >= evidence.min_window_s
        && net >= min_growth as i64
        && late_slope > 0.0
        && late_net >= (min_growth as f64 / 4.0).max(1.0)
        && rising_steps * 10 >= steps * 7
        && r2 >= 0.8;
    let confidence = if r2 >= 0.95 && samples.len() >= 10 && window_s >= 1.5 * evidence.min_window_s
    {
        Confidence::High
    } else if r2 >= 0.9 {
        Confidence::Medium
    } else {
        Confidence::Low
    };
    let suspected = growing.then_some(confidence);
    Some(Trend {
        slope_per_s: slope,
        r2,
        samples: samples.len(),
        window_s,
        net_growth: net,
        rising_steps,
        steps,
        suspected,
    })
}

/// Samples of every site's outstanding count over time.
#[derive(Default)]
pub struct GrowthTracker {
    series: HashMap<u32, VecDeque<(f64, u64)>>,
}

impl GrowthTracker {
    /// Records the counts (indexed by site) at `t` seconds.
    pub fn record(&mut self, t: f64, counts: &[u64]) {
        for (site, &count) in counts.iter().enumerate() {
            let s = self.series.entry(site as u32).or_default();
            if s.len() == WINDOW {
                s.pop_front();
            }
            s.push_back((t, count));
        }
    }

    /// The trend of one site.
    pub fn trend(&self, site: u32, evidence: Evidence) -> Option<Trend> {
        let s = self.series.get(&site)?;
        let v: Vec<(f64, u64)> = s.iter().copied().collect();
        judge(&v, evidence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Growth of 10 objects over at least 2 s (the samples are 0.5 s apart).
    fn ev(min_growth: u64) -> Evidence {
        Evidence {
            min_growth,
            min_window_s: 2.0,
        }
    }

    fn series(f: impl Fn(f64) -> u64, n: usize) -> Vec<(f64, u64)> {
        (0..n)
            .map(|i| (i as f64 * 0.5, f(i as f64 * 0.5)))
            .collect()
    }

    #[test]
    fn steady_growth_is_a_leak() {
        let t = judge(&series(|t| 100 + (t * 40.0) as u64, 12), ev(10)).unwrap();
        assert_eq!(t.suspected, Some(Confidence::High));
        assert!((t.slope_per_s - 40.0).abs() < 1.0, "{t:?}");
        assert!(t.reason().contains("+40"));
    }

    #[test]
    fn a_flat_or_noisy_count_is_not() {
        let flat = judge(&series(|t| 50 + ((t * 7.0) as u64 % 3), 12), ev(10)).unwrap();
        assert_eq!(flat.suspected, None);
        let shrinking = judge(&series(|t| 500 - (t * 10.0) as u64, 12), ev(10)).unwrap();
        assert_eq!(shrinking.suspected, None);
    }

    #[test]
    fn warm_up_then_flat_is_not() {
        let t = judge(
            &series(|t| if t < 1.0 { (t * 50.0) as u64 } else { 50 }, 14),
            ev(10),
        )
        .unwrap();
        assert_eq!(t.suspected, None, "{t:?}");
    }

    #[test]
    fn small_growth_or_few_samples_say_nothing() {
        assert!(judge(&series(|t| t as u64, 3), ev(10)).is_none());
        let tiny = judge(&series(|t| (t / 2.0) as u64, 12), ev(10)).unwrap();
        assert_eq!(tiny.suspected, None);
    }

    #[test]
    fn tracker_keeps_a_window_per_site() {
        let mut g = GrowthTracker::default();
        for i in 0..100 {
            g.record(i as f64, &[i, 5]);
        }
        let grow = g.trend(0, ev(10)).unwrap();
        assert_eq!(grow.samples, WINDOW);
        assert!(grow.suspected.is_some());
        assert!(g.trend(1, ev(10)).unwrap().suspected.is_none());
    }

    #[test]
    fn a_short_burst_is_not_enough_evidence() {
        // Steady growth, but watched for 5.5 s of a required 60.
        let steady = series(|t| 100 + (t * 40.0) as u64, 12);
        let long = Evidence {
            min_growth: 10,
            min_window_s: 60.0,
        };
        assert_eq!(judge(&steady, long).unwrap().suspected, None);
        // 30 samples 5 s apart: 145 s of growth, high confidence.
        let minutes: Vec<(f64, u64)> = (0..30).map(|i| (i as f64 * 5.0, 100 + i * 5)).collect();
        assert_eq!(
            judge(&minutes, long).unwrap().suspected,
            Some(Confidence::High)
        );
        // 13 samples, 60 s: medium at most.
        assert_eq!(
            judge(&minutes[..13], long).unwrap().suspected,
            Some(Confidence::Medium)
        );
    }
}
