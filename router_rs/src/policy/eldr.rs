use super::{Fleet, Policy};
use crate::error::{Result, RouterError};

/// ELDR locality band: keep the healthy workers whose score is within `tau` of the best,
/// add the nearest alternative when `tau > 0` leaves a band of one, then pick the least
/// loaded member. Load ties go to the higher score, then the lower index: with a pure
/// lowest-index tie break, two decoders with equal load would always resolve to decoder 0 and a
/// two-decoder fleet would degenerate into JSQ. Without scores (zero signature) it is JSQ.
///
/// Starvation guard: with `max_imbalance = Some(m)`, a choice whose in-flight count would exceed
/// the least-loaded healthy worker's by more than `m` is replaced by the best-scoring worker among
/// the least loaded, whatever the locality says.
#[derive(Debug, Clone, Copy)]
pub struct LocalityBand {
    tau: f32,
    // Decided from the f64 the caller gave: a positive tau below f32's range still widens the band.
    widen: bool,
    max_imbalance: Option<i64>,
}

impl LocalityBand {
    pub fn new(tau: f64) -> Result<Self> {
        Self::with_guard(tau, None)
    }

    pub fn with_guard(tau: f64, max_imbalance: Option<i64>) -> Result<Self> {
        if !tau.is_finite() || tau < 0.0 {
            return Err(RouterError::Tau(tau));
        }
        if let Some(m) = max_imbalance {
            if m < 0 {
                return Err(RouterError::Invalid { arg: "max_imbalance", reason: format!("must be >= 0, got {m}") });
            }
        }
        Ok(Self { tau: tau as f32, widen: tau > 0.0, max_imbalance })
    }

    pub fn max_imbalance(&self) -> Option<i64> {
        self.max_imbalance
    }

    pub fn tau(&self) -> f32 {
        self.tau
    }

    /// Writes the band (ascending worker index) for `scores` into `band`.
    pub fn band(&self, fleet: &Fleet, scores: &[f32], band: &mut Vec<usize>) {
        band.clear();
        let Some(best) = fleet.healthy.iter().zip(scores).filter(|(h, _)| **h).map(|(_, s)| *s).reduce(f32::max)
        else {
            return;
        };
        let threshold = best - self.tau;
        band.extend((0..scores.len()).filter(|&k| fleet.healthy[k] && scores[k] >= threshold));
        if self.widen && band.len() == 1 {
            let inside = band[0];
            // max_by picks the last maximum; iterate in reverse so ties go to the lowest index.
            let alternative = (0..scores.len())
                .rev()
                .filter(|&k| k != inside && fleet.healthy[k])
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            if let Some(alt) = alternative {
                band.push(alt);
                band.sort_unstable();
            }
        }
    }
}

impl Policy for LocalityBand {
    fn name(&self) -> &'static str {
        "eldr"
    }

    fn choose(&mut self, fleet: &Fleet, scores: Option<&[f32]>, band: &mut Vec<usize>) -> Result<usize> {
        fleet.require_healthy()?;
        match scores {
            Some(s) => {
                self.band(fleet, s, band);
                let by_load_then_score = |&a: &usize, &b: &usize| {
                    (fleet.loads[a].cmp(&fleet.loads[b])).then(s[b].total_cmp(&s[a])).then(a.cmp(&b))
                };
                let pick = band.iter().copied().min_by(by_load_then_score).expect("band holds a healthy worker");
                if let Some(m) = self.max_imbalance {
                    let least = fleet.least_loaded(0..fleet.workers()).expect("a healthy worker exists");
                    if fleet.loads[pick] + 1 > fleet.loads[least] + 1 + m {
                        let all = (0..fleet.workers()).filter(|&k| fleet.healthy[k]);
                        return Ok(all.min_by(by_load_then_score).expect("a healthy worker exists"));
                    }
                }
                Ok(pick)
            }
            None => {
                band.clear();
                Ok(fleet.least_loaded(0..fleet.workers()).expect("a healthy worker exists"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(tau: f64, scores: &[f32], loads: &[i64]) -> (usize, Vec<usize>) {
        let healthy = vec![true; scores.len()];
        let fleet = Fleet { loads, healthy: &healthy };
        let mut band = Vec::new();
        let w = LocalityBand::new(tau).unwrap().choose(&fleet, Some(scores), &mut band).unwrap();
        (w, band)
    }

    #[test]
    fn tau_zero_is_argmax() {
        assert_eq!(pick(0.0, &[0.1, 0.9, 0.5], &[0, 10, 0]), (1, vec![1]));
    }

    #[test]
    fn nearest_alternative_joins_a_band_of_one() {
        assert_eq!(pick(0.05, &[0.1, 0.9, 0.5], &[0, 10, 0]), (2, vec![1, 2]));
    }

    #[test]
    fn tau_below_f32_range_still_widens_the_band() {
        assert_eq!(pick(1e-207, &[0.1, 0.9, 0.5], &[0, 10, 0]), (2, vec![1, 2]));
    }

    #[test]
    fn tau_one_is_least_loaded() {
        assert_eq!(pick(1.0, &[0.1, 0.9, 0.5], &[3, 2, 1]).0, 2);
    }

    #[test]
    fn ties_go_to_lowest_index() {
        assert_eq!(pick(0.0, &[0.7, 0.7, 0.7], &[4, 1, 1]), (1, vec![0, 1, 2]));
    }

    #[test]
    fn load_ties_go_to_the_better_score() {
        assert_eq!(pick(0.5, &[0.6, 0.9, 0.5], &[1, 1, 0]), (2, vec![0, 1, 2]));
        assert_eq!(pick(0.5, &[0.6, 0.9, 0.5], &[1, 1, 1]), (1, vec![0, 1, 2]));
        assert_eq!(pick(0.1, &[0.9, 0.3], &[0, 0]), (0, vec![0, 1]));
        assert_eq!(pick(0.1, &[0.3, 0.9], &[0, 0]), (1, vec![0, 1]));
    }

    #[test]
    fn no_scores_means_least_loaded() {
        let fleet = Fleet { loads: &[2, 1, 1], healthy: &[true; 3] };
        assert_eq!(LocalityBand::new(0.1).unwrap().choose(&fleet, None, &mut Vec::new()), Ok(1));
    }

    #[test]
    fn unhealthy_best_is_skipped() {
        let fleet = Fleet { loads: &[0, 0, 0], healthy: &[true, false, true] };
        let mut band = Vec::new();
        let w = LocalityBand::new(0.0).unwrap().choose(&fleet, Some(&[0.2, 0.9, 0.5]), &mut band).unwrap();
        assert_eq!((w, band), (2, vec![2]));
    }

    #[test]
    fn imbalance_guard_overrides_locality() {
        let fleet = Fleet { loads: &[5, 1, 2], healthy: &[true; 3] };
        let mut band = Vec::new();
        let scores = [0.9, 0.1, 0.2];
        assert_eq!(LocalityBand::with_guard(0.0, None).unwrap().choose(&fleet, Some(&scores), &mut band), Ok(0));
        assert_eq!(LocalityBand::with_guard(0.0, Some(4)).unwrap().choose(&fleet, Some(&scores), &mut band), Ok(0));
        assert_eq!(LocalityBand::with_guard(0.0, Some(3)).unwrap().choose(&fleet, Some(&scores), &mut band), Ok(1));
        assert!(LocalityBand::with_guard(0.1, Some(-1)).is_err());
    }

    #[test]
    fn bad_tau_is_refused() {
        assert_eq!(LocalityBand::new(-0.1).unwrap_err(), RouterError::Tau(-0.1));
        assert!(LocalityBand::new(f64::NAN).is_err());
    }
}
