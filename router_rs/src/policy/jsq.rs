use super::{FleetView, Policy};
use crate::model::Scores;
use crate::error::Result;

/// Join-shortest-queue: fewest in-flight requests, ties to the lowest index.
#[derive(Debug, Default, Clone, Copy)]
pub struct JoinShortestQueue;

impl Policy for JoinShortestQueue {
    fn name(&self) -> &'static str {
        "jsq"
    }

    fn choose(&mut self, fleet: &FleetView, _scores: Option<&mut Scores>, band: &mut Vec<usize>) -> Result<usize> {
        band.clear();
        fleet.require_healthy()?;
        Ok(fleet.least_loaded(0..fleet.workers()).expect("a healthy worker exists"))
    }
}
