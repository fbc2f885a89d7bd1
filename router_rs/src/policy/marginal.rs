//! Marginal-cost decode routing: each request goes where it adds the least predicted decode time.
//!
//! One decode step of a decoder costs `S = a + b·n + c·D` (the simulator's cost model and the
//! measured profiles): `n` requests in its batch, `D` the distinct (layer, expert) pairs they read.
//! A running request `r` is modelled by its prefill's expert frequencies
//! `q_r[l,e] = k · counts[l,e]^γ / Σ_e' counts[l,e']^γ` (the chance one of its decode tokens picks
//! expert `e` at layer `l`, top-`k` routing; γ is the sharpness, below), so a batch's expected
//! distinct pairs are
//! `D = Σ (1 − Π_r (1 − q_r))`, and a new request `q` adds `ΔD = Σ q · Π_r (1 − q_r)`.
//! Joining decoder `d` costs the new request that decoder's step time and each of its `n_d`
//! running requests the increase:
//!
//! `ΔT_d = (S_d + b + c·ΔD_d) + n_d · (b + c·ΔD_d)`
//!
//! The healthy decoder with the smallest `ΔT` wins (ties: fewer in flight, then the lower index).
//! With a batch cap (the decoders' largest running batch), a decoder already holding that many
//! requests is passed over while another has room: a newcomer there would wait for a slot before
//! its first token, a cost the step model does not see (the simulator measured TTFT p99 up to
//! +59 % without the cap).
//! The load term is in the model itself: every running request pays for a newcomer, so a busy
//! decoder must save more distinct experts than an idle one to win. A request without counts has
//! `q = 0` (it is placed by load alone).
//!
//! The sharpness γ weighs a request's most used experts up: γ = 1 is the raw frequencies, the best
//! calibrated per-token guess (the tiny model's traces give decode choices a higher likelihood
//! under γ = 1 than under 2), but placement only needs the ranking of overlaps, and in the
//! simulator γ = 2 (the default) saves more distinct experts and more TPOT (RESULTS.md §5d).
//!
//! State per decoder: `Π_r (1 − q_r)` per pair (multiplied in on acquire, divided out on release;
//! `q` is capped at [`Q_MAX`] so the division stays well conditioned) and `D`, recomputed from it.
//! Each admitted request gets a ticket that its release hands back. Loads, health and membership
//! are the [`Router`](crate::router::Router)'s (its `Fleet`); this holds only the expected experts,
//! one row per member in member order.
use std::collections::HashMap;

use multiversion::multiversion;
use crate::error::{Result, RouterError};
use crate::fleet::WorkerId;
use crate::kernel::lane_dot;
use crate::model::Signal;
use crate::policy::FleetView;
use crate::signature::CountValue;

/// Cap on one pair's per-token probability (a request whose tokens all pick one expert).
pub const Q_MAX: f64 = 0.95;
/// The default sharpness γ of the expected frequencies (see the module doc).
pub const DEFAULT_SHARPNESS: f64 = 2.0;
/// The range a sharpness must lie in: flatter than 1/8 or sharper than 8 predicts nothing a
/// uniform or a one-hot guess would not.
pub const SHARPNESS_RANGE: (f64, f64) = (0.125, 8.0);

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

/// The MoE shape the per-request frequencies need: counts are `[layers, experts]` and every
/// token picks `top_k` experts per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGeometry {
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
}

impl ExpertGeometry {
    pub fn new(layers: usize, experts: usize, top_k: usize) -> Result<Self> {
        if layers == 0 || experts == 0 || top_k == 0 || top_k > experts {
            return Err(RouterError::Invalid {
                arg: "geometry",
                reason: format!("need layers, experts >= 1 and 1 <= top_k <= experts, got ({layers}, {experts}, top_k {top_k})"),
            });
        }
        Ok(Self { layers, experts, top_k })
    }

    fn pairs(self) -> usize {
        self.layers * self.experts
    }
}

pub struct MarginalCost {
    cost: StepCost,
    geometry: Option<ExpertGeometry>,
    keep: Vec<f64>,     // [members, pairs]: Π_r (1 − q_r); empty until the geometry is known
    distinct: Vec<f64>, // [members]: Σ (1 − keep)
    tickets: HashMap<u64, (WorkerId, Vec<f64>)>,
    next_ticket: u64,
    batch_cap: Option<u32>,
    sharpness: f64,
    /// n^γ for the counts n below its length, where γ is neither 1 nor 2 (`powf` on each of
    /// thousands of counts would cost tens of microseconds a decision).
    powers: Vec<f64>,
}

/// Counts below this take n^γ from a table.
const POWER_TABLE: usize = 4096;

impl MarginalCost {
    /// For `members` decoders; without a geometry requests are placed by load alone until
    /// [`set_geometry`](Self::set_geometry).
    pub fn new(members: usize, cost: StepCost, geometry: Option<ExpertGeometry>) -> Result<Self> {
        let mut m = Self {
            cost: cost.check()?,
            geometry: None,
            keep: Vec::new(),
            distinct: vec![0.0; members],
            tickets: HashMap::new(),
            next_ticket: 1,
            batch_cap: None,
            sharpness: DEFAULT_SHARPNESS,
            powers: Vec::new(),
        };
        if let Some(g) = geometry {
            m.set_geometry(g)?;
        }
        Ok(m)
    }

    pub fn cost(&self) -> StepCost {
        self.cost
    }
    pub fn batch_cap(&self) -> Option<u32> {
        self.batch_cap
    }
    /// Requests in flight at which a decoder counts as full (None: never).
    pub fn set_batch_cap(&mut self, cap: Option<u32>) -> Result<()> {
        if cap == Some(0) {
            return Err(RouterError::Invalid { arg: "batch_cap", reason: "must be >= 1 (or none)".into() });
        }
        self.batch_cap = cap;
        Ok(())
    }
    pub fn sharpness(&self) -> f64 {
        self.sharpness
    }
    /// The exponent γ of `q ∝ counts^γ`, for requests admitted from now on (those in flight keep
    /// the frequencies they were admitted with, so their release undoes exactly what was added).
    pub fn set_sharpness(&mut self, gamma: f64) -> Result<()> {
        let (lo, hi) = SHARPNESS_RANGE;
        if !(lo..=hi).contains(&gamma) {
            return Err(RouterError::Invalid { arg: "sharpness", reason: format!("must be in [{lo}, {hi}], got {gamma}") });
        }
        self.sharpness = gamma;
        self.powers = if gamma == 1.0 || gamma == 2.0 {
            Vec::new()
        } else {
            (0..POWER_TABLE).map(|n| (n as f64).powf(gamma)).collect()
        };
        Ok(())
    }
    pub fn geometry(&self) -> Option<ExpertGeometry> {
        self.geometry
    }
    /// Expected distinct (layer, expert) pairs per step of each member's running requests.
    pub fn expected_distinct(&self) -> &[f64] {
        &self.distinct
    }

    /// Fixes the geometry (once; the same one again is a no-op). Requests admitted before had no
    /// frequencies, so nothing is lost.
    pub fn set_geometry(&mut self, g: ExpertGeometry) -> Result<()> {
        let g = ExpertGeometry::new(g.layers, g.experts, g.top_k)?;
        match self.geometry {
            Some(old) if old == g => Ok(()),
            Some(old) => Err(RouterError::Invalid {
                arg: "geometry",
                reason: format!("already ({}, {}, top_k {}), got ({}, {}, top_k {})", old.layers, old.experts, old.top_k,
                                g.layers, g.experts, g.top_k),
            }),
            None => {
                self.keep = vec![1.0; self.distinct.len() * g.pairs()];
                self.geometry = Some(g);
                Ok(())
            }
        }
    }

    /// `q` of one request: from counts `[layers, experts]`, empty (load alone) without counts.
    /// A signature is refused, since the expected experts need the counts themselves.
    pub fn frequencies<T: CountValue>(&self, signal: Signal<T>) -> Result<Vec<f64>> {
        let (counts, rows, cols) = match signal {
            Signal::Counts { data, rows, cols } => (data, rows, cols),
            Signal::Absent => return Ok(Vec::new()),
            Signal::Signature(_) => {
                return Err(RouterError::Invalid {
                    arg: "counts",
                    reason: "the marginal-cost policy needs counts [layers, experts], not a signature".into(),
                })
            }
        };
        let g = self.geometry.ok_or(RouterError::Invalid {
            arg: "counts",
            reason: "the marginal-cost policy has no model geometry yet (set_geometry)".into(),
        })?;
        if (rows, cols) != (g.layers, g.experts) || counts.len() != rows * cols {
            return Err(RouterError::Shape {
                arg: "counts",
                expected: format!("[{}, {}]", g.layers, g.experts),
                got: format!("[{rows}, {cols}]"),
            });
        }
        if let Some(index) = counts.iter().position(|c| c.is_negative()) {
            return Err(RouterError::Negative { arg: "counts", index, value: counts[index].as_f64() });
        }
        let mut q: Vec<f64> = counts.iter().map(|c| c.as_f64()).collect();
        let gamma = self.sharpness;
        if gamma == 2.0 {
            q.iter_mut().for_each(|v| *v *= *v);
        } else if gamma != 1.0 {
            for v in q.iter_mut() {
                let n = *v as usize;
                *v = if n as f64 == *v && n < self.powers.len() { self.powers[n] } else { v.powf(gamma) };
            }
        }
        for row in q.chunks_exact_mut(cols) {
            let total: f64 = row.iter().sum();
            if total > 0.0 && total.is_finite() {
                let scale = g.top_k as f64 / total;
                row.iter_mut().for_each(|v| *v = (*v * scale).min(Q_MAX));
            } else {
                // No counts in this layer, or counts so large that c^γ overflowed: nothing known.
                row.fill(0.0);
            }
        }
        Ok(q)
    }

    /// `ΔT` of placing a request with frequencies `q` on each member (unhealthy: infinite).
    pub fn costs(&self, q: &[f64], fleet: &FleetView) -> Vec<f64> {
        let pairs = self.geometry.map_or(0, |g| g.pairs());
        let StepCost { a, b, c } = self.cost;
        (0..fleet.workers())
            .map(|d| {
                if !fleet.healthy[d] {
                    return f64::INFINITY;
                }
                let new = if q.is_empty() { 0.0 } else { lane_dot(q, &self.keep[d * pairs..(d + 1) * pairs]) };
                let n = fleet.loads[d] as f64;
                let step = a + b * n + c * self.distinct[d];
                (step + b + c * new) + n * (b + c * new)
            })
            .collect()
    }

    /// The member with the smallest `ΔT` among those with room under the batch cap (all healthy
    /// ones when none has room; ties: fewer in flight, then the lower index) and every member's `ΔT`.
    pub fn choose(&self, q: &[f64], fleet: &FleetView) -> Result<(usize, Vec<f64>)> {
        let costs = self.costs(q, fleet);
        let best = |room: bool| {
            (0..fleet.workers())
                .filter(|&d| costs[d].is_finite() && (!room || self.batch_cap.is_none_or(|cap| fleet.loads[d] < i64::from(cap))))
                .min_by(|&x, &y| costs[x].total_cmp(&costs[y]).then(fleet.loads[x].cmp(&fleet.loads[y])).then(x.cmp(&y)))
        };
        let worker = best(true).or_else(|| best(false)).ok_or(RouterError::AllUnhealthy(fleet.workers()))?;
        Ok((worker, costs))
    }

    /// Counts `q` on member `index` (id `id`); returns the request's ticket.
    pub fn admit(&mut self, index: usize, id: WorkerId, q: Vec<f64>) -> u64 {
        self.apply(index, &q, true, false);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(ticket, (id, q));
        ticket
    }

    /// The member a ticket in flight was placed on.
    pub fn owner(&self, ticket: u64) -> Option<WorkerId> {
        self.tickets.get(&ticket).map(|(id, _)| *id)
    }

    /// Takes the ticket back: the member it was placed on and its frequencies.
    pub fn retire(&mut self, ticket: u64) -> Result<(WorkerId, Vec<f64>)> {
        self.tickets.remove(&ticket).ok_or(RouterError::Invalid {
            arg: "ticket",
            reason: format!("{ticket} is not in flight (released twice, or never issued)"),
        })
    }

    /// Removes a retired request's `q` from member `index`; `idle` when it has nothing in flight
    /// now (its row is reset, so no rounding drift survives an idle decoder).
    pub fn unapply(&mut self, index: usize, q: &[f64], idle: bool) {
        self.apply(index, q, false, idle);
    }

    /// A member was added at the end.
    pub fn push_member(&mut self) {
        let pairs = self.geometry.map_or(0, |g| g.pairs());
        self.keep.extend(std::iter::repeat_n(1.0, pairs));
        self.distinct.push(0.0);
    }

    /// Member `index` was removed (later ones shift down); its tickets release nothing here.
    pub fn remove_member(&mut self, index: usize) {
        let pairs = self.geometry.map_or(0, |g| g.pairs());
        self.keep.drain(index * pairs..(index + 1) * pairs);
        self.distinct.remove(index);
    }

    fn apply(&mut self, index: usize, q: &[f64], add: bool, idle: bool) {
        let pairs = self.geometry.map_or(0, |g| g.pairs());
        let keep = &mut self.keep[index * pairs..(index + 1) * pairs];
        if idle {
            keep.fill(1.0);
        } else if !q.is_empty() {
            for (k, x) in keep.iter_mut().zip(q) {
                if *x > 0.0 {
                    *k = if add { *k * (1.0 - x) } else { (*k / (1.0 - x)).min(1.0) };
                }
            }
        }
        // Summed afresh (not moved by the change), so no rounding drift accumulates.
        self.distinct[index] = missing(keep);
    }
}

/// Σ (1 − k): the expected distinct pairs of a member's running requests, in eight lanes like
/// [`lane_dot`] (a left-to-right sum of 6 144 pairs cost ≈ 8 µs per decoder).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn missing(keep: &[f64]) -> f64 {
    const N: usize = 8;
    let mut acc = [0.0f64; N];
    let mut kc = keep.chunks_exact(N);
    for k in &mut kc {
        for j in 0..N {
            acc[j] += 1.0 - k[j];
        }
    }
    acc.iter().sum::<f64>() + kc.remainder().iter().map(|k| 1.0 - k).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy with loads and health kept here, as the router's fleet keeps them.
    struct Bench {
        m: MarginalCost,
        loads: Vec<i64>,
        healthy: Vec<bool>,
    }

    impl Bench {
        fn new(workers: usize, cost: StepCost) -> Self {
            let m = MarginalCost::new(workers, cost, Some(ExpertGeometry::new(2, 4, 1).unwrap())).unwrap();
            Self { m, loads: vec![0; workers], healthy: vec![true; workers] }
        }

        fn acquire<T: CountValue>(&mut self, signal: Signal<T>) -> Result<(usize, u64, Vec<f64>)> {
            let q = self.m.frequencies(signal)?;
            let (w, costs) = self.m.choose(&q, &FleetView { loads: &self.loads, healthy: &self.healthy })?;
            self.loads[w] += 1;
            Ok((w, self.m.admit(w, w as u64, q), costs))
        }

        fn release(&mut self, ticket: u64) -> Result<usize> {
            let (id, q) = self.m.retire(ticket)?;
            let w = id as usize;
            self.loads[w] -= 1;
            self.m.unapply(w, &q, self.loads[w] == 0);
            Ok(w)
        }
    }

    fn counts<T: CountValue>(c: &[T; 8]) -> Signal<'_, T> {
        Signal::Counts { data: &c[..], rows: 2, cols: 4 }
    }

    #[test]
    fn same_experts_go_together_when_experts_cost() {
        let mut r = Bench::new(2, StepCost { a: 0.0, b: 0.0, c: 1.0 });
        let x: [u32; 8] = [4, 0, 0, 0, 4, 0, 0, 0];
        let y: [u32; 8] = [0, 0, 0, 4, 0, 0, 0, 4];
        assert_eq!(r.acquire(counts(&x)).unwrap().0, 0);
        // y on the busy decoder would add 2 new pairs and slow one request; on the idle one 2 pairs.
        assert_eq!(r.acquire(counts(&y)).unwrap().0, 1);
        // another x: no new pairs on decoder 0 (q capped at 0.95, so 0.05·0.95 each), 2 on decoder 1
        let (w, _, costs) = r.acquire(counts(&x)).unwrap();
        assert_eq!(w, 0);
        assert!(costs[0] < costs[1]);
    }

    #[test]
    fn a_full_decoder_is_passed_over_while_another_has_room() {
        let x: [u32; 8] = [4, 0, 0, 0, 4, 0, 0, 0];
        let y: [u32; 8] = [0, 0, 0, 4, 0, 0, 0, 4];
        let picks = |cap: Option<u32>| {
            let mut r = Bench::new(2, StepCost { a: 0.0, b: 0.0, c: 1.0 });
            r.m.set_batch_cap(cap).unwrap();
            let mut out = vec![r.acquire(counts(&x)).unwrap().0, r.acquire(counts(&y)).unwrap().0];
            out.extend((0..3).map(|_| r.acquire(counts(&x)).unwrap().0));
            (out, r)
        };
        // Without a cap the x requests all join decoder 0, where their experts already are.
        assert_eq!(picks(None).0, vec![0, 1, 0, 0, 0]);
        // With a cap of 2, decoder 0 is full after the second x; the next goes where there is room,
        // and once both are full the cost decides again.
        let (capped, mut r) = picks(Some(2));
        assert_eq!(capped, vec![0, 1, 0, 1, 0]);
        assert_eq!(r.loads, vec![3, 2]);
        // Room never makes an unhealthy decoder eligible.
        r.loads = vec![2, 0];
        r.healthy[1] = false;
        assert_eq!(r.acquire(counts(&x)).unwrap().0, 0);
        assert!(r.m.set_batch_cap(Some(0)).is_err());
    }

    #[test]
    fn sharpness_raises_counts_to_its_power() {
        let mut r = Bench::new(1, StepCost { a: 0.0, b: 0.0, c: 1.0 });
        let x: [u32; 8] = [1, 3, 0, 0, 0, 0, 0, 0];
        let q = |r: &Bench| r.m.frequencies(counts(&x)).unwrap();
        assert_eq!(r.m.sharpness(), DEFAULT_SHARPNESS);
        assert_eq!(q(&r)[..2], [0.1, 0.9]); // 1² : 3², top-1
        assert!(q(&r)[2..].iter().all(|&v| v == 0.0)); // the empty layer predicts nothing
        r.m.set_sharpness(1.0).unwrap();
        assert_eq!(q(&r)[..2], [0.25, 0.75]);
        r.m.set_sharpness(0.5).unwrap();
        assert!((q(&r)[0] - 1.0 / (1.0 + 3f64.sqrt())).abs() < 1e-15);
        // Counts past the table take powf: the same values as the table's.
        let big: [u32; 8] = [1, 3, 0, 0, 5000, 15000, 0, 0];
        let qb = r.m.frequencies(counts(&big)).unwrap();
        assert_eq!(qb[..2], q(&r)[..2]);
        assert!((qb[4] - 1.0 / (1.0 + 3f64.sqrt())).abs() < 1e-12);
        for bad in [0.0, -1.0, 8.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(r.m.set_sharpness(bad), Err(RouterError::Invalid { arg: "sharpness", .. })));
        }
        assert_eq!(r.m.sharpness(), 0.5);
    }

    #[test]
    fn per_request_cost_balances_load() {
        let mut r = Bench::new(3, StepCost { a: 1.0, b: 1.0, c: 0.0 });
        let picks: Vec<usize> = (0..6).map(|_| r.acquire(Signal::<u32>::Absent).unwrap().0).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn release_restores_the_state_and_refuses_twice() {
        let mut r = Bench::new(2, StepCost { a: 0.1, b: 0.1, c: 1.0 });
        let x: [i32; 8] = [3, 1, 0, 0, 0, 2, 2, 0];
        let (p, pt, _) = r.acquire(counts(&x)).unwrap();
        let (q, qt, _) = r.acquire(counts(&x)).unwrap();
        assert!(r.m.expected_distinct()[p] > 0.0);
        assert_eq!(r.release(pt).unwrap(), p);
        assert_eq!(r.release(qt).unwrap(), q);
        assert_eq!(r.loads, [0, 0]);
        assert_eq!(r.m.expected_distinct(), &[0.0, 0.0]);
        assert!(matches!(r.release(pt), Err(RouterError::Invalid { arg: "ticket", .. })));
    }

    #[test]
    fn unhealthy_is_skipped_and_all_unhealthy_refused() {
        let mut r = Bench::new(2, StepCost { a: 1.0, b: 1.0, c: 1.0 });
        r.healthy = vec![false, true];
        assert_eq!(r.acquire(Signal::<u8>::Absent).unwrap().0, 1);
        r.healthy = vec![false, false];
        assert_eq!(r.acquire(Signal::<u8>::Absent), Err(RouterError::AllUnhealthy(2)));
    }

    #[test]
    fn members_come_and_go_with_their_rows() {
        let mut r = Bench::new(2, StepCost { a: 0.0, b: 0.0, c: 1.0 });
        let x: [u32; 8] = [4, 0, 0, 0, 4, 0, 0, 0];
        r.acquire(counts(&x)).unwrap();
        r.m.push_member();
        r.loads.push(0);
        r.healthy.push(true);
        assert_eq!(r.m.expected_distinct().len(), 3);
        r.m.remove_member(0);
        r.loads.remove(0);
        r.healthy.remove(0);
        assert_eq!(r.m.expected_distinct(), &[0.0, 0.0]);
    }

    #[test]
    fn geometry_is_set_once_and_bad_input_is_a_typed_error() {
        let cost = StepCost { a: 1.0, b: 1.0, c: 1.0 };
        let mut m = MarginalCost::new(2, cost, None).unwrap();
        let x: [u32; 8] = [1, 0, 0, 0, 0, 0, 0, 1];
        assert!(matches!(m.frequencies(counts(&x)), Err(RouterError::Invalid { arg: "counts", .. })));
        assert_eq!(m.frequencies(Signal::<u32>::Absent).unwrap(), Vec::<f64>::new());
        m.set_geometry(ExpertGeometry { layers: 2, experts: 4, top_k: 1 }).unwrap();
        m.set_geometry(ExpertGeometry { layers: 2, experts: 4, top_k: 1 }).unwrap();
        assert!(m.set_geometry(ExpertGeometry { layers: 2, experts: 4, top_k: 2 }).is_err());
        assert_eq!(m.frequencies(counts(&x)).unwrap()[0], 0.95);
        let neg: [i32; 8] = [1, -1, 0, 0, 0, 0, 0, 0];
        assert!(matches!(m.frequencies(counts(&neg)), Err(RouterError::Negative { index: 1, .. })));
        let short: [i32; 4] = [1, 0, 0, 0];
        assert!(matches!(m.frequencies(Signal::Counts { data: &short[..], rows: 1, cols: 4 }), Err(RouterError::Shape { .. })));
        let sig = [1.0f32; 8];
        assert!(matches!(m.frequencies(Signal::<u8>::Signature(&sig)), Err(RouterError::Invalid { arg: "counts", .. })));
        assert!(MarginalCost::new(2, StepCost { a: f64::NAN, b: 0.0, c: 0.0 }, None).is_err());
        assert!(ExpertGeometry::new(2, 4, 5).is_err());
    }
}
