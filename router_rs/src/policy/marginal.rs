//! Marginal-cost decode routing: each request goes where it adds the least predicted decode time.
//!
//! One decode step of a decoder costs `S = a + b·n + c·D` (the simulator's cost model and the
//! measured profiles): `n` requests in its batch, `D` the distinct (layer, expert) pairs they read.
//! A running request `r` is modelled by its prefill's expert frequencies
//! `q_r[l,e] = k · counts[l,e] / Σ_e' counts[l,e']` (the chance one of its decode tokens picks
//! expert `e` at layer `l`, top-`k` routing), so a batch's expected distinct pairs are
//! `D = Σ (1 − Π_r (1 − q_r))`, and a new request `q` adds `ΔD = Σ q · Π_r (1 − q_r)`.
//! Joining decoder `d` costs the new request that decoder's step time and each of its `n_d`
//! running requests the increase:
//!
//! `ΔT_d = (S_d + b + c·ΔD_d) + n_d · (b + c·ΔD_d)`
//!
//! The healthy decoder with the smallest `ΔT` wins (ties: fewer in flight, then the lower index).
//! The load term is in the model itself: every running request pays for a newcomer, so a busy
//! decoder must save more distinct experts than an idle one to win. A request without counts has
//! `q = 0` (it is placed by load alone).
//!
//! State per decoder: `Π_r (1 − q_r)` per pair (multiplied in on acquire, divided out on release;
//! `q` is capped at [`Q_MAX`] so the division stays well conditioned) and `D`, recomputed from it.
//! Each acquire returns a ticket that its release hands back.
use std::collections::HashMap;

use crate::error::{Result, RouterError};
use crate::model::Signal;
use crate::signature::CountValue;

/// Cap on one pair's per-token probability (a request whose tokens all pick one expert).
pub const Q_MAX: f64 = 0.95;

/// Step-time coefficients: seconds per step, per request in the batch, per distinct pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl StepCost {
    fn check(self) -> Result<Self> {
        for (arg, v) in [("cost.a", self.a), ("cost.b", self.b), ("cost.c", self.c)] {
            if !v.is_finite() || v < 0.0 {
                return Err(RouterError::Invalid { arg, reason: format!("must be finite and >= 0, got {v}") });
            }
        }
        Ok(self)
    }
}

/// One decision: the chosen decoder, the request's ticket, and `ΔT` for every decoder (seconds;
/// infinite for unhealthy ones).
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub worker: usize,
    pub ticket: u64,
    pub costs: Vec<f64>,
    pub loads: Vec<i64>,
}

pub struct MarginalCost {
    layers: usize,
    experts: usize,
    top_k: usize,
    cost: StepCost,
    keep: Vec<f64>,     // [workers, layers·experts]: Π_r (1 − q_r)
    distinct: Vec<f64>, // [workers]: Σ (1 − keep)
    loads: Vec<i64>,
    tickets: HashMap<u64, (usize, Vec<f64>)>,
    next_ticket: u64,
}

impl MarginalCost {
    pub fn new(workers: usize, layers: usize, experts: usize, top_k: usize, cost: StepCost) -> Result<Self> {
        if workers == 0 {
            return Err(RouterError::NoWorkers);
        }
        if layers == 0 || experts == 0 || top_k == 0 || top_k > experts {
            return Err(RouterError::Invalid {
                arg: "geometry",
                reason: format!("need layers, experts >= 1 and 1 <= top_k <= experts, got ({layers}, {experts}, top_k {top_k})"),
            });
        }
        Ok(Self {
            layers,
            experts,
            top_k,
            cost: cost.check()?,
            keep: vec![1.0; workers * layers * experts],
            distinct: vec![0.0; workers],
            loads: vec![0; workers],
            tickets: HashMap::new(),
            next_ticket: 1,
        })
    }

    pub fn workers(&self) -> usize {
        self.loads.len()
    }
    pub fn loads(&self) -> &[i64] {
        &self.loads
    }
    /// Expected distinct (layer, expert) pairs per step of each decoder's running requests.
    pub fn expected_distinct(&self) -> &[f64] {
        &self.distinct
    }
    pub fn cost(&self) -> StepCost {
        self.cost
    }

    /// `q` of one request from its prefill counts `[layers, experts]` (row-major).
    pub fn frequencies<T: CountValue>(&self, counts: &[T], rows: usize, cols: usize) -> Result<Vec<f64>> {
        if (rows, cols) != (self.layers, self.experts) {
            return Err(RouterError::Shape {
                arg: "counts",
                expected: format!("[{}, {}]", self.layers, self.experts),
                got: format!("[{rows}, {cols}]"),
            });
        }
        if let Some(index) = counts.iter().position(|c| c.is_negative()) {
            return Err(RouterError::Negative { arg: "counts", index, value: counts[index].as_f64() });
        }
        let mut q = vec![0.0; counts.len()];
        for (row, out) in counts.chunks_exact(cols).zip(q.chunks_exact_mut(cols)) {
            let total: f64 = row.iter().map(|c| c.as_f64()).sum();
            if total > 0.0 {
                let scale = self.top_k as f64 / total;
                for (o, c) in out.iter_mut().zip(row) {
                    *o = (c.as_f64() * scale).min(Q_MAX);
                }
            }
        }
        Ok(q)
    }

    /// `ΔT` of placing a request with frequencies `q` on each decoder (unhealthy: infinite).
    pub fn costs(&self, q: &[f64], healthy: Option<&[bool]>) -> Result<Vec<f64>> {
        let w = self.workers();
        if let Some(h) = healthy {
            if h.len() != w {
                return Err(RouterError::Shape { arg: "healthy", expected: format!("[{w}]"), got: format!("[{}]", h.len()) });
            }
        }
        let pairs = self.layers * self.experts;
        let StepCost { a, b, c } = self.cost;
        Ok((0..w)
            .map(|d| {
                if healthy.is_some_and(|h| !h[d]) {
                    return f64::INFINITY;
                }
                let keep = &self.keep[d * pairs..(d + 1) * pairs];
                let new: f64 = q.iter().zip(keep).map(|(x, k)| x * k).sum();
                let n = self.loads[d] as f64;
                let step = a + b * n + c * self.distinct[d];
                (step + b + c * new) + n * (b + c * new)
            })
            .collect())
    }

    /// Chooses a decoder for a request and counts it in flight there. `Signal::Absent` (no counts)
    /// places it by load alone (an empty `q` reads as all zeros); a signature is refused, since the
    /// expected experts need the counts themselves.
    pub fn acquire<T: CountValue>(&mut self, signal: Signal<T>, healthy: Option<&[bool]>) -> Result<Placement> {
        let q = match signal {
            Signal::Counts { data, rows, cols } => self.frequencies(data, rows, cols)?,
            Signal::Absent => Vec::new(),
            Signal::Signature(_) => {
                return Err(RouterError::Invalid {
                    arg: "counts",
                    reason: "the marginal-cost policy needs counts [layers, experts], not a signature".into(),
                })
            }
        };
        let costs = self.costs(&q, healthy)?;
        let worker = (0..self.workers())
            .filter(|&d| costs[d].is_finite())
            .min_by(|&x, &y| costs[x].total_cmp(&costs[y]).then(self.loads[x].cmp(&self.loads[y])).then(x.cmp(&y)))
            .ok_or(RouterError::AllUnhealthy(self.workers()))?;
        let loads = self.loads.clone();
        self.apply(worker, &q, true);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(ticket, (worker, q));
        Ok(Placement { worker, ticket, costs, loads })
    }

    /// Ends the request holding `ticket`; returns the decoder it ran on.
    pub fn release(&mut self, ticket: u64) -> Result<usize> {
        let (worker, q) = self.tickets.remove(&ticket).ok_or(RouterError::Invalid {
            arg: "ticket",
            reason: format!("{ticket} is not in flight (released twice, or never issued)"),
        })?;
        self.apply(worker, &q, false);
        Ok(worker)
    }

    fn apply(&mut self, worker: usize, q: &[f64], add: bool) {
        let pairs = self.layers * self.experts;
        let keep = &mut self.keep[worker * pairs..(worker + 1) * pairs];
        for (k, x) in keep.iter_mut().zip(q) {
            if *x > 0.0 {
                *k = if add { *k * (1.0 - x) } else { (*k / (1.0 - x)).min(1.0) };
            }
        }
        self.loads[worker] += if add { 1 } else { -1 };
        if self.loads[worker] == 0 {
            keep.fill(1.0); // no drift survives an idle decoder
        }
        // Summed afresh (not moved by the change): the measured figures in RESULTS §5b are this sum's.
        self.distinct[worker] = keep.iter().map(|k| 1.0 - k).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts<T: CountValue>(c: &[T; 8]) -> Signal<'_, T> {
        Signal::Counts { data: &c[..], rows: 2, cols: 4 }
    }

    fn router(workers: usize, cost: StepCost) -> MarginalCost {
        MarginalCost::new(workers, 2, 4, 1, cost).unwrap()
    }

    #[test]
    fn same_experts_go_together_when_experts_cost() {
        let mut r = router(2, StepCost { a: 0.0, b: 0.0, c: 1.0 });
        let x: [u32; 8] = [4, 0, 0, 0, 4, 0, 0, 0];
        let y: [u32; 8] = [0, 0, 0, 4, 0, 0, 0, 4];
        let first = r.acquire(counts(&x), None).unwrap();
        assert_eq!(first.worker, 0);
        // y on the busy decoder would add 2 new pairs and slow one request; on the idle one 2 pairs.
        assert_eq!(r.acquire(counts(&y), None).unwrap().worker, 1);
        // another x: no new pairs on decoder 0 (q capped at 0.95, so 0.05·0.95 each), 2 on decoder 1
        let again = r.acquire(counts(&x), None).unwrap();
        assert_eq!(again.worker, 0);
        assert!(again.costs[0] < again.costs[1]);
    }

    #[test]
    fn per_request_cost_balances_load() {
        let mut r = router(3, StepCost { a: 1.0, b: 1.0, c: 0.0 });
        let picks: Vec<usize> = (0..6).map(|_| r.acquire(Signal::<u32>::Absent, None).unwrap().worker).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn release_restores_the_state_and_refuses_twice() {
        let mut r = router(2, StepCost { a: 0.1, b: 0.1, c: 1.0 });
        let x: [i32; 8] = [3, 1, 0, 0, 0, 2, 2, 0];
        let p = r.acquire(counts(&x), None).unwrap();
        let q = r.acquire(counts(&x), None).unwrap();
        assert!(r.expected_distinct()[p.worker] > 0.0);
        assert_eq!(r.release(p.ticket).unwrap(), p.worker);
        assert_eq!(r.release(q.ticket).unwrap(), q.worker);
        assert_eq!(r.loads(), &[0, 0]);
        assert_eq!(r.expected_distinct(), &[0.0, 0.0]);
        assert!(matches!(r.release(p.ticket), Err(RouterError::Invalid { arg: "ticket", .. })));
    }

    #[test]
    fn unhealthy_is_skipped_and_all_unhealthy_refused() {
        let mut r = router(2, StepCost { a: 1.0, b: 1.0, c: 1.0 });
        assert_eq!(r.acquire(Signal::<u8>::Absent, Some(&[false, true])).unwrap().worker, 1);
        assert_eq!(r.acquire(Signal::<u8>::Absent, Some(&[false, false])), Err(RouterError::AllUnhealthy(2)));
        assert!(matches!(r.acquire(Signal::<u8>::Absent, Some(&[true])), Err(RouterError::Shape { .. })));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let mut r = router(2, StepCost { a: 1.0, b: 1.0, c: 1.0 });
        let neg: [i32; 8] = [1, -1, 0, 0, 0, 0, 0, 0];
        assert!(matches!(r.acquire(counts(&neg), None), Err(RouterError::Negative { index: 1, .. })));
        let short: [i32; 4] = [1, 0, 0, 0];
        assert!(matches!(r.acquire(Signal::Counts { data: &short[..], rows: 1, cols: 4 }, None), Err(RouterError::Shape { .. })));
        let sig = [1.0f32; 8];
        assert!(matches!(r.acquire(Signal::<u8>::Signature(&sig), None), Err(RouterError::Invalid { arg: "counts", .. })));
        assert!(MarginalCost::new(2, 2, 4, 1, StepCost { a: f64::NAN, b: 0.0, c: 0.0 }).is_err());
        assert!(MarginalCost::new(2, 2, 4, 5, StepCost { a: 0.0, b: 0.0, c: 0.0 }).is_err());
        assert_eq!(r.loads(), &[0, 0]);
    }
}
