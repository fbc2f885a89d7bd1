use super::{FleetView, Policy};
use crate::model::Scores;
use crate::error::Result;

/// Power of two choices: sample two distinct healthy workers, keep the less loaded one
/// (ties to the lower index). Reproducible under a seed.
#[derive(Debug, Clone)]
pub struct PowerOfTwo {
    rng: fastrand::Rng,
}

impl PowerOfTwo {
    pub fn new(seed: u64) -> Self {
        Self { rng: fastrand::Rng::with_seed(seed) }
    }
}

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "p2c"
    }

    fn choose(&mut self, fleet: &FleetView, _scores: Option<&mut Scores>, band: &mut Vec<usize>) -> Result<usize> {
        band.clear();
        fleet.require_healthy()?;
        let n = fleet.healthy_count();
        let healthy_nth = |i: usize| (0..fleet.workers()).filter(|&k| fleet.healthy[k]).nth(i).expect("i < n");
        if n == 1 {
            return Ok(healthy_nth(0));
        }
        let a = self.rng.usize(..n);
        let b = (a + 1 + self.rng.usize(..n - 1)) % n;
        let (a, b) = (healthy_nth(a), healthy_nth(b));
        band.extend([a.min(b), a.max(b)]);
        Ok(fleet.least_loaded([a, b]).expect("both healthy"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_picks_the_strictly_most_loaded_of_many() {
        let loads = [1, 1, 1, 100];
        let fleet = FleetView { loads: &loads, healthy: &[true; 4] };
        let mut p = PowerOfTwo::new(3);
        for _ in 0..200 {
            assert_ne!(p.choose(&fleet, None, &mut Vec::new()).unwrap(), 3);
        }
    }
}
