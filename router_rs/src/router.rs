//! The stateful router: one policy, its own in-flight counters and health flags, and (for the
//! eldr policy) a locality model whose centroids can be swapped atomically while serving.
use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::centroids::Centroids;
use crate::error::{Result, RouterError};
use crate::policy::{self, Fleet, LocalityBand, Policy};
use crate::signature::{check_finite, CountValue, SignatureSpec};

/// What a request tells the router about itself.
#[derive(Debug, Clone, Copy)]
pub enum Signal<'a, T: CountValue = u8> {
    /// Raw prefill counts `[rows, cols]`, row-major.
    Counts { data: &'a [T], rows: usize, cols: usize },
    /// A ready signature of dimension D (need not be normalised).
    Signature(&'a [f32]),
    /// Nothing known: locality policies fall back to least-loaded.
    Absent,
}

/// Geometry + calibration transforms + unit centroids.
#[derive(Debug, Clone)]
pub struct LocalityModel {
    spec: SignatureSpec,
    centroids: Centroids,
}

impl LocalityModel {
    pub fn new(spec: SignatureSpec, centroids: Centroids) -> Result<Self> {
        if spec.dim() != centroids.dim() {
            return Err(RouterError::Shape {
                arg: "centroids",
                expected: format!("[W, {}] (kept layers × experts)", spec.dim()),
                got: format!("[{}, {}]", centroids.workers(), centroids.dim()),
            });
        }
        Ok(Self { spec, centroids })
    }

    pub fn spec(&self) -> &SignatureSpec {
        &self.spec
    }
    pub fn centroids(&self) -> &Centroids {
        &self.centroids
    }

    /// Scores into `scratch.scores`; `Ok(false)` when the signal carries no direction.
    fn score<T: CountValue>(&self, signal: Signal<T>, scratch: &mut Scratch) -> Result<bool> {
        match signal {
            Signal::Counts { data, rows, cols } => {
                self.spec.build(data, rows, cols, &mut scratch.x)?;
                Ok(self.centroids.cosines(&scratch.x, &mut scratch.scores))
            }
            Signal::Signature(sig) => {
                if sig.len() != self.centroids.dim() {
                    return Err(RouterError::Shape {
                        arg: "signature",
                        expected: format!("[{}]", self.centroids.dim()),
                        got: format!("[{}]", sig.len()),
                    });
                }
                check_finite("signature", sig)?;
                Ok(self.centroids.cosines(sig, &mut scratch.scores))
            }
            Signal::Absent => Ok(false),
        }
    }
}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    scores: Vec<f32>,
    band: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct Fleetwide {
    loads: Vec<i64>,
    healthy: Vec<bool>,
    policy: Box<dyn Policy>,
}

/// One routing decision with the evidence behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub worker: usize,
    /// Cosine to each worker's centroid (eldr with a non-zero signature only).
    pub scores: Option<Vec<f32>>,
    /// Candidate set the policy chose from (eldr band; p2c's two samples; empty otherwise).
    pub band: Vec<usize>,
    /// In-flight counts just before this request was added.
    pub loads: Vec<i64>,
}

pub struct Router {
    workers: usize,
    state: Mutex<Fleetwide>,
    /// Present for the eldr policy only; swapped whole so readers never see a torn model.
    model: Option<RwLock<Arc<LocalityModel>>>,
    band: Option<LocalityBand>,
    all_healthy: Vec<bool>,
}

impl Router {
    /// A load-only baseline (`rr`, `random`, `jsq`, `p2c`) over `workers` decoders.
    pub fn baseline(name: &str, workers: usize, seed: u64) -> Result<Self> {
        if workers == 0 {
            return Err(RouterError::NoWorkers);
        }
        Ok(Self::build(workers, policy::by_name(name, seed)?, None, None))
    }

    /// The ELDR locality-band policy; one worker per centroid row.
    pub fn locality(model: LocalityModel, tau: f64) -> Result<Self> {
        Self::locality_guarded(model, tau, None)
    }

    /// As [`locality`](Self::locality), with the starvation guard of [`LocalityBand::with_guard`].
    pub fn locality_guarded(model: LocalityModel, tau: f64, max_imbalance: Option<i64>) -> Result<Self> {
        let band = LocalityBand::with_guard(tau, max_imbalance)?;
        let workers = model.centroids().workers();
        Ok(Self::build(workers, Box::new(band), Some(RwLock::new(Arc::new(model))), Some(band)))
    }

    fn build(
        workers: usize,
        policy: Box<dyn Policy>,
        model: Option<RwLock<Arc<LocalityModel>>>,
        band: Option<LocalityBand>,
    ) -> Self {
        let state = Fleetwide { loads: vec![0; workers], healthy: vec![true; workers], policy };
        Self { workers, state: Mutex::new(state), model, band, all_healthy: vec![true; workers] }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
    pub fn policy(&self) -> &'static str {
        self.lock().policy.name()
    }
    pub fn tau(&self) -> Option<f32> {
        self.band.map(|b| b.tau())
    }
    pub fn max_imbalance(&self) -> Option<i64> {
        self.band.and_then(|b| b.max_imbalance())
    }

    /// The current locality model (a cheap reference; stays valid across swaps).
    pub fn model(&self) -> Result<Arc<LocalityModel>> {
        let lock = self.model.as_ref().ok_or(RouterError::NoLocality("centroids"))?;
        Ok(lock.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn lock(&self) -> MutexGuard<'_, Fleetwide> {
        // A panic while holding the lock cannot leave the counters half-updated (single writes),
        // so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_worker(&self, worker: usize) -> Result<()> {
        if worker >= self.workers {
            return Err(RouterError::WorkerOutOfRange { worker, workers: self.workers });
        }
        Ok(())
    }

    /// One in-flight count (>= 0) per worker, and one health flag per worker when given.
    fn check_fleet(&self, loads: &[i64], healthy: Option<&[bool]>) -> Result<()> {
        self.check_len("loads", loads.len())?;
        if let Some(h) = healthy {
            self.check_len("healthy", h.len())?;
        }
        if let Some(index) = loads.iter().position(|l| *l < 0) {
            return Err(RouterError::Negative { arg: "loads", index, value: loads[index] as f64 });
        }
        Ok(())
    }

    fn check_len(&self, arg: &'static str, len: usize) -> Result<()> {
        if len != self.workers {
            return Err(RouterError::Shape { arg, expected: format!("[{}]", self.workers), got: format!("[{len}]") });
        }
        Ok(())
    }

    fn with_scores<T: CountValue, R>(
        &self,
        signal: Signal<T>,
        f: impl FnOnce(Option<&[f32]>, &mut Vec<usize>) -> Result<R>,
    ) -> Result<R> {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let has_scores = match &self.model {
                Some(_) => self.model()?.score(signal, &mut scratch)?,
                None => false,
            };
            let Scratch { scores, band, .. } = &mut *scratch;
            f(if has_scores { Some(scores.as_slice()) } else { None }, band)
        })
    }

    /// Cosine scores of the signal to every centroid (zeros for a zero signature).
    pub fn scores<T: CountValue>(&self, signal: Signal<T>) -> Result<Vec<f32>> {
        let workers = self.workers;
        self.with_scores(signal, |s, _| Ok(s.map(<[f32]>::to_vec).unwrap_or_else(|| vec![0.0; workers])))
    }

    /// Pure locality-band decision for given loads (and health, all healthy when `None`).
    /// Touches no router state.
    pub fn select<T: CountValue>(&self, signal: Signal<T>, loads: &[i64], healthy: Option<&[bool]>) -> Result<usize> {
        let mut band_policy = self.band.ok_or(RouterError::NoLocality("select"))?;
        self.check_fleet(loads, healthy)?;
        let healthy = healthy.unwrap_or(&self.all_healthy);
        let fleet = Fleet { loads, healthy };
        self.with_scores(signal, |scores, band| band_policy.choose(&fleet, scores, band))
    }

    /// Chooses a worker and counts the request as in flight on it.
    pub fn acquire<T: CountValue>(&self, signal: Signal<T>) -> Result<usize> {
        self.with_scores(signal, |scores, band| {
            let mut st = self.lock();
            let st = &mut *st;
            let fleet = Fleet { loads: &st.loads, healthy: &st.healthy };
            let w = st.policy.choose(&fleet, scores, band)?;
            st.loads[w] += 1;
            Ok(w)
        })
    }

    /// As [`acquire`](Self::acquire), also returning why the worker was chosen.
    pub fn acquire_with_receipt<T: CountValue>(&self, signal: Signal<T>) -> Result<Receipt> {
        self.with_scores(signal, |scores, band| {
            let mut st = self.lock();
            let st = &mut *st;
            let fleet = Fleet { loads: &st.loads, healthy: &st.healthy };
            let worker = st.policy.choose(&fleet, scores, band)?;
            let receipt =
                Receipt { worker, scores: scores.map(<[f32]>::to_vec), band: band.clone(), loads: st.loads.clone() };
            st.loads[worker] += 1;
            Ok(receipt)
        })
    }

    /// Ends one in-flight request on `worker`. Refuses (never wraps) below zero.
    pub fn release(&self, worker: usize) -> Result<()> {
        self.check_worker(worker)?;
        let mut st = self.lock();
        if st.loads[worker] == 0 {
            return Err(RouterError::ReleaseUnderflow(worker));
        }
        st.loads[worker] -= 1;
        Ok(())
    }

    pub fn loads(&self) -> Vec<i64> {
        self.lock().loads.clone()
    }

    pub fn healthy(&self) -> Vec<bool> {
        self.lock().healthy.clone()
    }

    pub fn set_healthy(&self, worker: usize, healthy: bool) -> Result<()> {
        self.check_worker(worker)?;
        self.lock().healthy[worker] = healthy;
        Ok(())
    }

    /// Sets every worker's in-flight count and health at once. For a router built to replace
    /// another after a membership change: the survivors' requests are still in flight.
    pub fn restore_state(&self, loads: &[i64], healthy: &[bool]) -> Result<()> {
        self.check_fleet(loads, Some(healthy))?;
        let mut st = self.lock();
        st.loads.copy_from_slice(loads);
        st.healthy.copy_from_slice(healthy);
        Ok(())
    }

    /// Replaces the centroids (`[workers, dim]`, same shape as before). Worker `k` stays worker
    /// `k`: loads and health are untouched, so align rows to identities before swapping.
    pub fn swap_centroids(&self, data: &[f32], rows: usize, cols: usize) -> Result<()> {
        let lock = self.model.as_ref().ok_or(RouterError::NoLocality("swap_centroids"))?;
        let current = self.model()?;
        if rows != self.workers || cols != current.centroids().dim() {
            return Err(RouterError::Shape {
                arg: "centroids",
                expected: format!("[{}, {}]", self.workers, current.centroids().dim()),
                got: format!("[{rows}, {cols}]"),
            });
        }
        let next = LocalityModel::new(current.spec().clone(), Centroids::new(data, rows, cols)?)?;
        *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(())
    }
}

/// Times `iters` pure `select` calls from raw counts, returning nanoseconds per call. Exposed
/// so the Python benchmark can measure the Rust core without the FFI boundary.
pub fn time_select<T: CountValue>(
    router: &Router,
    signal: Signal<T>,
    loads: &[i64],
    iters: usize,
) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        std::hint::black_box(router.select(std::hint::black_box(signal), loads, None)?);
        out.push(t.elapsed().as_nanos() as u64);
    }
    Ok(out)
}
