use super::{FleetView, Policy};
use crate::model::Scores;
use crate::error::Result;

/// Round-robin over healthy workers.
#[derive(Debug, Default, Clone)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "rr"
    }

    fn choose(&mut self, fleet: &FleetView, _scores: Option<&mut Scores>, band: &mut Vec<usize>) -> Result<usize> {
        band.clear();
        fleet.require_healthy()?;
        let n = fleet.workers();
        let pick = (0..n).map(|i| (self.next + i) % n).find(|&k| fleet.healthy[k]).expect("a healthy worker exists");
        self.next = (pick + 1) % n;
        Ok(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_in_order() {
        let fleet = FleetView { loads: &[0; 3], healthy: &[true; 3] };
        let mut p = RoundRobin::default();
        let picks: Vec<usize> = (0..6).map(|_| p.choose(&fleet, None, &mut Vec::new()).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }
}
