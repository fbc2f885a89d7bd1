use super::{FleetView, Policy};
use crate::error::{Result, RouterError};
use crate::model::Scores;

/// ELDR locality band: keep the healthy workers whose score is within `tau` of the best,
/// add the nearest alternative when `tau > 0` leaves a band of one, then pick the least
/// loaded member. Load ties go to the higher score, then the lower index: with a pure
/// lowest-index tie break, two decoders with equal load would always resolve to decoder 0 and a
/// two-decoder fleet would degenerate into JSQ. Without scores (zero signature) it is JSQ.
///
/// Starvation guard: with `max_imbalance = Some(m)`, a choice whose in-flight count would exceed
/// the least-loaded healthy worker's by more than the allowance is replaced by the best-scoring
/// worker among the least loaded, whatever the locality says. The allowance is
/// max(m, ⌊fraction · mean in-flight of the healthy workers⌋): absolute with fraction 0, relative
/// to load otherwise (an absolute +2 at a mean of 30 in flight lets locality pick almost never,
/// at a mean of 1 almost always).
///
/// Scores arrive as intervals around certified estimates; each step narrows the intervals that
/// straddle what it compares (the maximum, the band edge, the nearest alternative, a load tie)
/// with the residual level where the first pass read int8, and asks for the exact score only of
/// those still straddling, so the decision is the one exact scores give.
#[derive(Debug, Clone, Copy)]
pub struct LocalityBand {
    tau: f64,
    max_imbalance: Option<i64>,
    imbalance_fraction: f64,
}

impl LocalityBand {
    pub fn new(tau: f64) -> Result<Self> {
        Self::with_guard(tau, None)
    }

    pub fn with_guard(tau: f64, max_imbalance: Option<i64>) -> Result<Self> {
        Self::with_relative_guard(tau, max_imbalance, 0.0)
    }

    /// The guard's allowance is max(`max_imbalance`, ⌊`fraction` · mean in-flight⌋).
    pub fn with_relative_guard(tau: f64, max_imbalance: Option<i64>, fraction: f64) -> Result<Self> {
        if !fraction.is_finite() || fraction < 0.0 {
            return Err(RouterError::Invalid { arg: "imbalance_fraction", reason: format!("must be finite and >= 0, got {fraction}") });
        }
        if fraction > 0.0 && max_imbalance.is_none() {
            return Err(RouterError::Invalid {
                arg: "imbalance_fraction",
                reason: "a relative guard needs max_imbalance (its floor, e.g. 1)".into(),
            });
        }
        if !tau.is_finite() || tau < 0.0 {
            return Err(RouterError::Tau(tau));
        }
        if let Some(m) = max_imbalance {
            if m < 0 {
                return Err(RouterError::Invalid { arg: "max_imbalance", reason: format!("must be >= 0, got {m}") });
            }
        }
        Ok(Self { tau, max_imbalance, imbalance_fraction: fraction })
    }

    pub fn max_imbalance(&self) -> Option<i64> {
        self.max_imbalance
    }

    pub fn tau(&self) -> f64 {
        self.tau
    }

    pub fn imbalance_fraction(&self) -> f64 {
        self.imbalance_fraction
    }

    /// How far above the least-loaded healthy worker a choice may be, or None without a guard.
    fn allowance(&self, fleet: &FleetView) -> Option<i64> {
        let floor = self.max_imbalance?;
        if self.imbalance_fraction == 0.0 {
            return Some(floor);
        }
        let (sum, n) = (0..fleet.workers())
            .filter(|&k| fleet.healthy[k])
            .fold((0i64, 0i64), |(s, n), k| (s + fleet.loads[k], n + 1));
        let relative = (self.imbalance_fraction * sum as f64 / n.max(1) as f64).floor() as i64;
        Some(floor.max(relative))
    }

    /// Writes the band (ascending worker index) into `band`. A decoder is placed from the
    /// intervals alone when they settle it against every value the best score can take; the
    /// best (and the decoder) is computed exactly only for a decoder they do not.
    pub fn band(&self, fleet: &FleetView, s: &mut Scores, band: &mut Vec<usize>) {
        band.clear();
        let n = fleet.workers();
        let healthy = |k: &usize| fleet.healthy[*k];
        let Some(lo_best) = (0..n).filter(healthy).map(|k| s.lo(k)).reduce(f64::max) else { return };
        let hi_best = (0..n).filter(healthy).map(|k| s.hi(k)).fold(f64::NEG_INFINITY, f64::max);
        // Rounding is monotone, so hi_best − tau ≥ the threshold ≥ lo_best − tau as computed.
        let (surely_in, surely_out) = (hi_best - self.tau, lo_best - self.tau);
        let mut threshold: Option<f64> = None;
        for k in (0..n).filter(healthy) {
            let settled = placed(s, k, surely_in, surely_out).or_else(|| {
                s.narrow([k]);
                placed(s, k, surely_in, surely_out)
            });
            let inside = settled.unwrap_or_else(|| {
                let t = match threshold {
                    Some(t) => t,
                    None => {
                        let best = max_exact(s, (0..n).filter(healthy)).expect("a healthy worker");
                        *threshold.insert(best - self.tau)
                    }
                };
                s.lo(k) >= t || (s.hi(k) >= t && s.exact(k) >= t)
            });
            if inside {
                band.push(k);
            }
        }
        if self.tau > 0.0 && band.len() == 1 {
            let inside = band[0];
            if let Some(alt) = argmax_exact(s, (0..n).filter(|&k| k != inside && fleet.healthy[k])) {
                band.push(alt);
                band.sort_unstable();
            }
        }
    }

    /// Least loaded of `candidates`, load ties to the higher score, then the lower index.
    fn least_loaded_best(fleet: &FleetView, s: &mut Scores, candidates: impl Iterator<Item = usize> + Clone) -> usize {
        let least = candidates.clone().map(|k| fleet.loads[k]).min().expect("a candidate");
        argmax_exact(s, candidates.filter(|&k| fleet.loads[k] == least)).expect("a candidate")
    }
}

/// Whether decoder k's interval alone places it inside (`surely_in` ≤ its lower end) or outside
/// (its upper end below `surely_out`) the band.
fn placed(s: &Scores, k: usize, surely_in: f64, surely_out: f64) -> Option<bool> {
    if s.lo(k) >= surely_in {
        Some(true)
    } else if s.hi(k) < surely_out {
        Some(false)
    } else {
        None
    }
}

/// The best lower bound over `ks`: the maximum lies among the decoders whose interval reaches it.
fn floor(s: &Scores, ks: impl Iterator<Item = usize>) -> f64 {
    ks.map(|k| s.lo(k)).fold(f64::NEG_INFINITY, f64::max)
}

/// [`floor`] after narrowing every interval that reaches it (two-level tables: the residual row of
/// each contender; elsewhere the floor itself). The highest upper end goes first: its int16
/// interval lifts the floor to about the maximum itself, which most of the other int8 intervals
/// (those within two int8 radii of the best estimate) then no longer reach.
fn narrowed_floor(s: &mut Scores, ks: impl Iterator<Item = usize> + Clone) -> f64 {
    if !s.can_narrow() {
        return floor(s, ks);
    }
    if let Some(top) = ks.clone().max_by(|&a, &b| s.hi(a).total_cmp(&s.hi(b))) {
        s.narrow([top]);
    }
    let f = floor(s, ks.clone());
    s.narrow_reaching(ks.clone(), f);
    floor(s, ks)
}

/// The exact maximum over `ks`.
fn max_exact(s: &mut Scores, ks: impl Iterator<Item = usize> + Clone) -> Option<f64> {
    let f = narrowed_floor(s, ks.clone());
    let mut best: Option<f64> = None;
    for k in ks {
        if s.hi(k) >= f {
            let v = s.exact(k);
            best = Some(best.map_or(v, |b| b.max(v)));
        }
    }
    best
}

/// The lowest index with the exact maximum over `ks` (a lone contender needs no exact score:
/// every other interval lies strictly below its lower bound).
fn argmax_exact(s: &mut Scores, ks: impl Iterator<Item = usize> + Clone) -> Option<usize> {
    let f = narrowed_floor(s, ks.clone());
    let mut reach = ks.clone().filter(|&k| s.hi(k) >= f);
    if let (Some(only), None) = (reach.next(), reach.next()) {
        return Some(only);
    }
    let mut best: Option<(usize, f64)> = None;
    for k in ks {
        if s.hi(k) < f {
            continue;
        }
        let v = s.exact(k);
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map(|(k, _)| k)
}

impl Policy for LocalityBand {
    fn name(&self) -> &'static str {
        "eldr"
    }

    fn choose(&mut self, fleet: &FleetView, scores: Option<&mut Scores>, band: &mut Vec<usize>) -> Result<usize> {
        fleet.require_healthy()?;
        let Some(s) = scores else {
            band.clear();
            return Ok(fleet.least_loaded(0..fleet.workers()).expect("a healthy worker exists"));
        };
        self.band(fleet, s, band);
        let pick = Self::least_loaded_best(fleet, s, band.iter().copied());
        if let Some(m) = self.allowance(fleet) {
            let least = fleet.least_loaded(0..fleet.workers()).expect("a healthy worker exists");
            if fleet.loads[pick] > fleet.loads[least] + m {
                let all = (0..fleet.workers()).filter(|&k| fleet.healthy[k]);
                return Ok(Self::least_loaded_best(fleet, s, all));
            }
        }
        Ok(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose_with(policy: LocalityBand, scores: &[f64], loads: &[i64], healthy: &[bool]) -> (usize, Vec<usize>) {
        let fleet = FleetView { loads, healthy };
        let (mut est, mut rad) = (scores.to_vec(), vec![0.0; scores.len()]);
        let mut band = Vec::new();
        let w = policy.clone().choose(&fleet, Some(&mut Scores::fixed(&mut est, &mut rad)), &mut band).unwrap();
        (w, band)
    }

    fn pick(tau: f64, scores: &[f64], loads: &[i64]) -> (usize, Vec<usize>) {
        choose_with(LocalityBand::new(tau).unwrap(), scores, loads, &vec![true; scores.len()])
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
    fn tiny_positive_tau_still_widens_the_band() {
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
        let fleet = FleetView { loads: &[2, 1, 1], healthy: &[true; 3] };
        assert_eq!(LocalityBand::new(0.1).unwrap().choose(&fleet, None, &mut Vec::new()), Ok(1));
    }

    #[test]
    fn unhealthy_best_is_skipped() {
        let (w, band) = choose_with(LocalityBand::new(0.0).unwrap(), &[0.2, 0.9, 0.5], &[0, 0, 0], &[true, false, true]);
        assert_eq!((w, band), (2, vec![2]));
    }

    #[test]
    fn imbalance_guard_overrides_locality() {
        let (scores, loads, h) = ([0.9, 0.1, 0.2], [5, 1, 2], [true; 3]);
        let guard = |m| LocalityBand::with_guard(0.0, m).unwrap();
        assert_eq!(choose_with(guard(None), &scores, &loads, &h).0, 0);
        assert_eq!(choose_with(guard(Some(4)), &scores, &loads, &h).0, 0);
        assert_eq!(choose_with(guard(Some(3)), &scores, &loads, &h).0, 1);
        assert!(LocalityBand::with_guard(0.1, Some(-1)).is_err());
    }

    #[test]
    fn relative_guard_scales_with_the_mean_load() {
        let scores = [0.9, 0.1, 0.1, 0.1];
        let h = [true; 4];
        let relative = LocalityBand::with_relative_guard(0.0, Some(1), 0.25).unwrap();
        // Mean 1.5: allowance max(1, 0) = 1; decoder 0 is 3 above the least loaded.
        assert_eq!(choose_with(relative, &scores, &[3, 0, 1, 2], &h).0, 1);
        // Mean 22: allowance max(1, 5) = 5; decoder 0 is 4 above: locality stands.
        assert_eq!(choose_with(relative, &scores, &[24, 20, 22, 22], &h).0, 0);
        // The absolute guard of 1 would have overridden it.
        assert_eq!(choose_with(LocalityBand::with_guard(0.0, Some(1)).unwrap(), &scores, &[24, 20, 22, 22], &h).0, 1);
        assert!(LocalityBand::with_relative_guard(0.0, None, 0.25).is_err());
        assert!(LocalityBand::with_relative_guard(0.0, Some(1), -0.1).is_err());
    }

    #[test]
    fn bad_tau_is_refused() {
        assert_eq!(LocalityBand::new(-0.1).unwrap_err(), RouterError::Tau(-0.1));
        assert!(LocalityBand::new(f64::NAN).is_err());
    }
}
