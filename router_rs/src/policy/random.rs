use super::{FleetView, Policy};
use crate::model::Scores;
use crate::error::Result;

/// Uniform choice among healthy workers, reproducible under a seed.
#[derive(Debug, Clone)]
pub struct Random {
    rng: fastrand::Rng,
}

impl Random {
    pub fn new(seed: u64) -> Self {
        Self { rng: fastrand::Rng::with_seed(seed) }
    }
}

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(&mut self, fleet: &FleetView, _scores: Option<&mut Scores>, band: &mut Vec<usize>) -> Result<usize> {
        band.clear();
        fleet.require_healthy()?;
        let nth = self.rng.usize(..fleet.healthy_count());
        Ok((0..fleet.workers()).filter(|&k| fleet.healthy[k]).nth(nth).expect("nth < healthy count"))
    }
}
