//! Decode-worker selection policies. Each policy sees the fleet (loads, health) and, when the
//! request carries a non-zero signature, its cosine scores to the worker centroids (as certified
//! intervals it can refine, `model::Scores`).
use crate::error::{Result, RouterError};
use crate::model::Scores;

mod eldr;
mod jsq;
mod marginal;
mod p2c;
mod random;
mod rr;

pub use eldr::LocalityBand;
pub use jsq::JoinShortestQueue;
pub use marginal::{ExpertGeometry, MarginalCost, StepCost, DEFAULT_SHARPNESS, Q_MAX, SHARPNESS_RANGE};
pub use p2c::PowerOfTwo;
pub use random::Random;
pub use rr::RoundRobin;

/// What a policy may look at: in-flight counts and health, one entry per worker.
#[derive(Debug, Clone, Copy)]
pub struct FleetView<'a> {
    pub loads: &'a [i64],
    pub healthy: &'a [bool],
}

impl FleetView<'_> {
    pub fn workers(&self) -> usize {
        self.loads.len()
    }

    pub fn healthy_count(&self) -> usize {
        self.healthy.iter().filter(|h| **h).count()
    }

    /// Healthy worker with the fewest in-flight requests; ties go to the lowest index.
    pub fn least_loaded(&self, candidates: impl IntoIterator<Item = usize>) -> Option<usize> {
        candidates
            .into_iter()
            .filter(|&k| self.healthy[k])
            .min_by_key(|&k| (self.loads[k], k))
    }

    pub(crate) fn require_healthy(&self) -> Result<()> {
        if self.healthy_count() == 0 {
            Err(RouterError::AllUnhealthy(self.workers()))
        } else {
            Ok(())
        }
    }
}

pub trait Policy: Send {
    fn name(&self) -> &'static str;

    /// Picks one healthy worker. `scores` is `Some` only for requests with a non-zero
    /// signature; `band` receives the candidate set when the policy has one (else cleared).
    fn choose(&mut self, fleet: &FleetView, scores: Option<&mut Scores>, band: &mut Vec<usize>) -> Result<usize>;
}

/// Names accepted by [`by_name`] for the load-only baselines.
pub const BASELINES: [&str; 4] = ["rr", "random", "jsq", "p2c"];

/// A load-only baseline policy by name; `seed` drives the randomised ones.
pub fn by_name(name: &str, seed: u64) -> Result<Box<dyn Policy>> {
    Ok(match name {
        "rr" => Box::new(RoundRobin::default()),
        "random" => Box::new(Random::new(seed)),
        "jsq" => Box::new(JoinShortestQueue),
        "p2c" => Box::new(PowerOfTwo::new(seed)),
        other => return Err(RouterError::UnknownPolicy(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_policy_is_a_typed_error() {
        assert!(matches!(by_name("nope", 0), Err(RouterError::UnknownPolicy(_))));
    }

    #[test]
    fn every_baseline_skips_unhealthy_workers() {
        let loads = [0, 5, 0, 9];
        let healthy = [false, true, false, true];
        let fleet = FleetView { loads: &loads, healthy: &healthy };
        for name in BASELINES {
            let mut p = by_name(name, 7).unwrap();
            let mut band = Vec::new();
            for _ in 0..50 {
                let w = p.choose(&fleet, None, &mut band).unwrap();
                assert!(healthy[w], "{name} chose unhealthy worker {w}");
            }
        }
    }

    #[test]
    fn every_baseline_refuses_when_all_unhealthy() {
        let fleet = FleetView { loads: &[0, 0], healthy: &[false, false] };
        for name in BASELINES {
            let mut p = by_name(name, 1).unwrap();
            assert_eq!(p.choose(&fleet, None, &mut Vec::new()), Err(RouterError::AllUnhealthy(2)));
        }
    }
}
