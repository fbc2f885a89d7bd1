//! The stateful router: the decoder set (membership, loads, health, breaker), one policy, and
//! (for the eldr policy) a locality model with one centroid per member, or (for the marginal
//! policy) the expected experts of each member's running requests. One lock guards it all,
//! so a decision, a release, a membership change or a centroid swap never sees another half done.
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::centroids::Centroids;
use crate::error::{Result, RouterError};
use crate::fleet::{Fleet, WorkerId};
use crate::kernel::quant::Precision;
use crate::model::{LocalityModel, ScoreBuf, Signal};
use crate::policy::{self, ExpertGeometry, FleetView, LocalityBand, MarginalCost, Policy, StepCost};
use crate::signature::{CountValue, SignatureSpec};

/// Consecutive failures that take a member out unless told otherwise.
pub const DEFAULT_BREAKER_FAILURES: u32 = 3;

#[derive(Default)]
struct Scratch {
    buf: ScoreBuf,
    band: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One routing decision with the evidence behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// Index of the chosen member (in member order) and its id.
    pub worker: usize,
    pub id: WorkerId,
    /// Cosine to each member's centroid (eldr with a non-zero signature only): exact where the
    /// decision computed it, else the certified estimate, each within `score_error` of exact.
    /// (The decision is the exact rule's either way; `Router::scores` gives every exact value.)
    pub scores: Option<Vec<f64>>,
    pub score_error: Option<f64>,
    /// Candidate set the policy chose from (eldr band; p2c's two samples; empty otherwise).
    pub band: Vec<usize>,
    /// In-flight counts just before this request was added.
    pub loads: Vec<i64>,
    /// Marginal policy only: the ticket its release hands back, and the predicted step-time
    /// increase `ΔT` (seconds) on every member.
    pub ticket: Option<u64>,
    pub costs: Option<Vec<f64>>,
}

/// A member as the router sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: WorkerId,
    pub key: String,
    pub load: i64,
    pub healthy: bool,
    pub failures: u32,
}

/// How a member is chosen: a stateless-per-request policy, or the marginal-cost policy, which
/// keeps each running request's expected experts until its ticket is released.
enum Decider {
    Policy(Box<dyn Policy>),
    Marginal(MarginalCost),
}

struct State {
    fleet: Fleet,
    decider: Decider,
    /// eldr only, once centroids are loaded: row k is member k.
    model: Option<Arc<LocalityModel>>,
    /// Centroid rows of removed members, by key, in the current model's space.
    retained: HashMap<String, Vec<f32>>,
}

pub struct Router {
    state: Mutex<State>,
    band: Option<LocalityBand>,
    precision: Precision,
}

fn default_keys(workers: usize) -> Vec<String> {
    (0..workers).map(|k| k.to_string()).collect()
}

impl Router {
    /// A load-only baseline (`rr`, `random`, `jsq`, `p2c`) over members `keys`.
    pub fn baseline<S: AsRef<str>>(name: &str, keys: &[S], seed: u64, breaker_failures: u32) -> Result<Self> {
        if keys.is_empty() {
            return Err(RouterError::NoWorkers);
        }
        let state = State {
            fleet: Fleet::new(keys, breaker_failures)?,
            decider: Decider::Policy(policy::by_name(name, seed)?),
            model: None,
            retained: HashMap::new(),
        };
        Ok(Self { state: Mutex::new(state), band: None, precision: Precision::Auto })
    }

    /// A baseline over `workers` members keyed "0", "1", ….
    pub fn baseline_n(name: &str, workers: usize, seed: u64) -> Result<Self> {
        Self::baseline(name, &default_keys(workers), seed, DEFAULT_BREAKER_FAILURES)
    }

    /// The ELDR locality-band policy over members `keys`, without centroids yet (it routes
    /// least-loaded until [`load_centroids`](Self::load_centroids)).
    pub fn locality<S: AsRef<str>>(
        keys: &[S],
        band: LocalityBand,
        precision: Precision,
        breaker_failures: u32,
    ) -> Result<Self> {
        if keys.is_empty() {
            return Err(RouterError::NoWorkers);
        }
        let state = State {
            fleet: Fleet::new(keys, breaker_failures)?,
            decider: Decider::Policy(Box::new(band)),
            model: None,
            retained: HashMap::new(),
        };
        Ok(Self { state: Mutex::new(state), band: Some(band), precision })
    }

    /// The marginal-cost policy over members `keys` with step cost `cost`. Without `geometry`,
    /// requests are placed by load alone until [`set_geometry`](Self::set_geometry).
    pub fn marginal<S: AsRef<str>>(keys: &[S], cost: StepCost, geometry: Option<ExpertGeometry>, breaker_failures: u32) -> Result<Self> {
        if keys.is_empty() {
            return Err(RouterError::NoWorkers);
        }
        let state = State {
            fleet: Fleet::new(keys, breaker_failures)?,
            decider: Decider::Marginal(MarginalCost::new(keys.len(), cost, geometry)?),
            model: None,
            retained: HashMap::new(),
        };
        Ok(Self { state: Mutex::new(state), band: None, precision: Precision::Auto })
    }

    /// Marginal policy: fixes the model geometry its frequencies need (once).
    pub fn set_geometry(&self, geometry: ExpertGeometry) -> Result<()> {
        match &mut self.lock().decider {
            Decider::Marginal(m) => m.set_geometry(geometry),
            Decider::Policy(_) => Err(RouterError::Invalid { arg: "geometry", reason: "only the marginal policy takes one".into() }),
        }
    }

    /// Marginal policy: requests in flight at which a decoder is passed over while another has
    /// room (None: no cap).
    pub fn set_batch_cap(&self, cap: Option<u32>) -> Result<()> {
        match &mut self.lock().decider {
            Decider::Marginal(m) => m.set_batch_cap(cap),
            Decider::Policy(_) => Err(RouterError::Invalid { arg: "batch_cap", reason: "only the marginal policy takes one".into() }),
        }
    }

    /// Marginal policy: the sharpness γ of its expected frequencies (`q ∝ counts^γ`).
    pub fn set_sharpness(&self, gamma: f64) -> Result<()> {
        match &mut self.lock().decider {
            Decider::Marginal(m) => m.set_sharpness(gamma),
            Decider::Policy(_) => Err(RouterError::Invalid { arg: "sharpness", reason: "only the marginal policy takes one".into() }),
        }
    }

    /// Marginal policy: its sharpness (None for other policies).
    pub fn sharpness(&self) -> Option<f64> {
        match &self.lock().decider {
            Decider::Marginal(m) => Some(m.sharpness()),
            Decider::Policy(_) => None,
        }
    }

    /// Marginal policy: its batch cap (None without one, and for other policies).
    pub fn batch_cap(&self) -> Option<u32> {
        match &self.lock().decider {
            Decider::Marginal(m) => m.batch_cap(),
            Decider::Policy(_) => None,
        }
    }

    /// Marginal policy: the geometry (None until set, and for other policies).
    pub fn geometry(&self) -> Option<ExpertGeometry> {
        match &self.lock().decider {
            Decider::Marginal(m) => m.geometry(),
            Decider::Policy(_) => None,
        }
    }

    /// Marginal policy: the step cost it predicts with.
    pub fn step_cost(&self) -> Option<StepCost> {
        match &self.lock().decider {
            Decider::Marginal(m) => Some(m.cost()),
            Decider::Policy(_) => None,
        }
    }

    /// Marginal policy: expected distinct (layer, expert) pairs per step on each member.
    pub fn expected_distinct(&self) -> Option<Vec<f64>> {
        match &self.lock().decider {
            Decider::Marginal(m) => Some(m.expected_distinct().to_vec()),
            Decider::Policy(_) => None,
        }
    }

    /// An eldr router with one member per centroid row, keyed "0", "1", ….
    pub fn with_model(model: LocalityModel, tau: f64, max_imbalance: Option<i64>) -> Result<Self> {
        let keys = default_keys(model.centroids().workers());
        let router = Self::locality(&keys, LocalityBand::with_guard(tau, max_imbalance)?, Precision::Auto, DEFAULT_BREAKER_FAILURES)?;
        router.lock().model = Some(Arc::new(model));
        Ok(router)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few single writes after all checks passed, so a panic cannot leave
        // the state half-updated and a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn workers(&self) -> usize {
        self.lock().fleet.len()
    }
    pub fn policy(&self) -> &'static str {
        match &self.lock().decider {
            Decider::Policy(p) => p.name(),
            Decider::Marginal(_) => "marginal",
        }
    }
    pub fn tau(&self) -> Option<f64> {
        self.band.map(|b| b.tau())
    }
    pub fn max_imbalance(&self) -> Option<i64> {
        self.band.and_then(|b| b.max_imbalance())
    }
    pub fn imbalance_fraction(&self) -> Option<f64> {
        self.band.map(|b| b.imbalance_fraction())
    }
    pub fn has_centroids(&self) -> bool {
        self.lock().model.is_some()
    }

    /// The current locality model (a cheap reference; stays valid across swaps).
    pub fn model(&self) -> Result<Arc<LocalityModel>> {
        self.lock().model.clone().ok_or(RouterError::NoLocality("centroids"))
    }

    fn check_fleet(workers: usize, loads: &[i64], healthy: Option<&[bool]>) -> Result<()> {
        let len = |arg, n: usize| {
            if n == workers {
                Ok(())
            } else {
                Err(RouterError::Shape { arg, expected: format!("[{workers}]"), got: format!("[{n}]") })
            }
        };
        len("loads", loads.len())?;
        if let Some(h) = healthy {
            len("healthy", h.len())?;
        }
        if let Some(index) = loads.iter().position(|l| *l < 0) {
            return Err(RouterError::Negative { arg: "loads", index, value: loads[index] as f64 });
        }
        Ok(())
    }

    /// Scores `signal` with `model` (if any) and lets `decide` choose; `decide` gets `None`
    /// scores when the signal carries no direction.
    fn decide<T: CountValue, R>(
        model: Option<&LocalityModel>,
        signal: Signal<T>,
        decide: impl FnOnce(Option<&mut crate::model::Scores>, &mut Vec<usize>) -> Result<R>,
    ) -> Result<R> {
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let Scratch { buf, band } = &mut *scratch;
            match model {
                Some(m) if m.score(signal, buf)? => decide(Some(&mut m.scores(buf, signal)), band),
                _ => decide(None, band),
            }
        })
    }

    /// Exact cosine scores of the signal to every centroid (zeros for a zero signature).
    pub fn scores<T: CountValue>(&self, signal: Signal<T>) -> Result<Vec<f64>> {
        let model = self.model()?;
        let w = model.centroids().workers();
        Self::decide(Some(&model), signal, |s, _| Ok(s.map(|s| s.all_exact()).unwrap_or_else(|| vec![0.0; w])))
    }

    /// Pure locality-band decision for given loads (and health, all healthy when `None`) over
    /// the current centroids; returns a member index. Touches no router state.
    pub fn select<T: CountValue>(&self, signal: Signal<T>, loads: &[i64], healthy: Option<&[bool]>) -> Result<usize> {
        let mut band_policy = self.band.ok_or(RouterError::NoLocality("select"))?;
        let model = self.model()?;
        let w = model.centroids().workers();
        Self::check_fleet(w, loads, healthy)?;
        // All healthy: a prefix of a static table (no allocation per call) up to its size.
        static ALL: [bool; 4096] = [true; 4096];
        let all = if healthy.is_none() && w > ALL.len() { vec![true; w] } else { Vec::new() };
        let fleet = FleetView { loads, healthy: healthy.unwrap_or(if w > ALL.len() { &all } else { &ALL[..w] }) };
        Self::decide(Some(&model), signal, |s, band| band_policy.choose(&fleet, s, band))
    }

    /// Chooses a member and counts the request as in flight on it; returns its id. (The marginal
    /// policy releases by ticket, so it needs [`acquire_with_receipt`](Self::acquire_with_receipt).)
    pub fn acquire<T: CountValue>(&self, signal: Signal<T>) -> Result<WorkerId> {
        let mut st = self.lock();
        let State { fleet, decider, model, .. } = &mut *st;
        let Decider::Policy(policy) = decider else {
            return Err(RouterError::Invalid { arg: "acquire", reason: "the marginal policy releases by ticket: use acquire_with_receipt".into() });
        };
        let index = Self::decide(model.as_deref(), signal, |s, band| policy.choose(&fleet.view(), s, band))?;
        Ok(fleet.acquire_at(index))
    }

    /// As [`acquire`](Self::acquire), also returning why the member was chosen.
    pub fn acquire_with_receipt<T: CountValue>(&self, signal: Signal<T>) -> Result<Receipt> {
        let mut st = self.lock();
        let State { fleet, decider, model, .. } = &mut *st;
        match decider {
            Decider::Policy(policy) => {
                let (worker, known, band) = Self::decide(model.as_deref(), signal, |s, band| {
                    let mut s = s;
                    let worker = policy.choose(&fleet.view(), s.as_deref_mut(), band)?;
                    Ok((worker, s.map(|s| s.known()), band.clone()))
                })?;
                let loads = fleet.loads().to_vec();
                let id = fleet.acquire_at(worker);
                let (scores, score_error) = known.unzip();
                Ok(Receipt { worker, id, scores, score_error, band, loads, ticket: None, costs: None })
            }
            Decider::Marginal(m) => {
                let q = m.frequencies(signal)?;
                let (worker, costs) = m.choose(&q, &fleet.view())?;
                let loads = fleet.loads().to_vec();
                let id = fleet.acquire_at(worker);
                let ticket = m.admit(worker, id, q);
                Ok(Receipt { worker, id, scores: None, score_error: None, band: Vec::new(), loads, ticket: Some(ticket), costs: Some(costs) })
            }
        }
    }

    /// Counts a request in flight on member `id`, chosen outside the policy (the prefill pool's
    /// picker).
    pub fn hold(&self, id: WorkerId) -> Result<()> {
        let mut st = self.lock();
        if matches!(st.decider, Decider::Marginal(_)) {
            // it could never be released: the marginal policy releases by ticket only
            return Err(RouterError::Invalid { arg: "hold", reason: "the marginal policy counts only what it placed".into() });
        }
        let i = st.fleet.position(id)?;
        st.fleet.acquire_at(i);
        Ok(())
    }

    /// Ends one in-flight request on member `id`; `Ok(false)` when it was removed meanwhile
    /// (then only its retired count drops). Refuses (never wraps) below zero. The marginal policy
    /// releases by [`release_ticket`](Self::release_ticket) instead.
    pub fn release(&self, id: WorkerId) -> Result<bool> {
        let mut st = self.lock();
        if matches!(st.decider, Decider::Marginal(_)) {
            return Err(RouterError::Invalid { arg: "ticket", reason: "the marginal policy releases by the ticket of its receipt".into() });
        }
        st.fleet.release(id)
    }

    /// Marginal policy: ends the request holding `ticket`, placed on member `id` (its expected
    /// experts lose it); returns whether `id` is still a member. A ticket of another member is
    /// refused and stays in flight.
    pub fn release_ticket(&self, id: WorkerId, ticket: u64) -> Result<bool> {
        let mut st = self.lock();
        let State { fleet, decider, .. } = &mut *st;
        let Decider::Marginal(m) = decider else {
            return Err(RouterError::Invalid { arg: "ticket", reason: "only the marginal policy issues tickets".into() });
        };
        match m.owner(ticket) {
            Some(owner) if owner != id => {
                return Err(RouterError::Invalid { arg: "ticket", reason: format!("{ticket} was issued for worker {owner}, not {id}") })
            }
            _ => {}
        }
        let (id, q) = m.retire(ticket)?;
        let member = fleet.release(id)?;
        if member {
            let index = fleet.position(id)?;
            m.unapply(index, &q, fleet.loads()[index] == 0);
        }
        Ok(member)
    }

    /// Requests in flight on member (or removed member) `id`.
    pub fn in_flight(&self, id: WorkerId) -> i64 {
        self.lock().fleet.in_flight(id)
    }

    pub fn loads(&self) -> Vec<i64> {
        self.lock().fleet.loads().to_vec()
    }
    pub fn healthy(&self) -> Vec<bool> {
        self.lock().fleet.healthy().to_vec()
    }
    pub fn ids(&self) -> Vec<WorkerId> {
        self.lock().fleet.ids().to_vec()
    }

    pub fn members(&self) -> Vec<Member> {
        let st = self.lock();
        let f = &st.fleet;
        (0..f.len())
            .map(|i| Member {
                id: f.ids()[i],
                key: f.keys()[i].clone(),
                load: f.loads()[i],
                healthy: f.healthy()[i],
                failures: f.failures()[i],
            })
            .collect()
    }

    /// Marks a member (un)healthy by hand; returns whether that changed it.
    pub fn set_healthy(&self, id: WorkerId, healthy: bool) -> Result<bool> {
        self.lock().fleet.set_healthy(id, healthy)
    }

    /// One circuit-breaker observation (see [`Fleet::report`]); the new health when it changed.
    pub fn report(&self, id: WorkerId, ok: bool) -> Result<Option<bool>> {
        self.lock().fleet.report(id, ok)
    }

    /// Adds a member. With centroids it gets its own row back if `key` was removed before, else
    /// the mean direction of the others (until a refit places it).
    pub fn add(&self, key: &str, healthy: bool) -> Result<WorkerId> {
        let mut st = self.lock();
        let State { fleet, model, retained, decider } = &mut *st;
        if fleet.position_of_key(key).is_some() {
            return Err(RouterError::DuplicateKey(key.to_string()));
        }
        let next = match model.as_deref() {
            Some(m) => {
                let row = retained.get(key).cloned().unwrap_or_else(|| m.centroids().mean_direction());
                Some(Arc::new(m.with_centroids(m.centroids().with_row(&row)?)?))
            }
            None => None,
        };
        let id = fleet.add(key, healthy)?;
        if let Decider::Marginal(m) = decider {
            m.push_member();
        }
        if next.is_some() {
            retained.remove(key);
            *model = next;
        }
        Ok(id)
    }

    /// Removes member `id` (later indices shift down); its requests in flight release nothing.
    /// Its centroid row is kept under its key in case it comes back. Returns its old index.
    pub fn remove(&self, id: WorkerId) -> Result<usize> {
        let mut st = self.lock();
        let State { fleet, model, retained, decider } = &mut *st;
        let index = fleet.position(id)?;
        let next = match model.as_deref() {
            Some(m) if fleet.len() > 1 => Some((m.centroids().row(index).to_vec(), Arc::new(m.with_centroids(m.centroids().without(index))?))),
            _ => None,
        };
        let (_, key) = fleet.remove(id)?;
        if let Decider::Marginal(m) = decider {
            m.remove_member(index);
        }
        if let Some((row, m)) = next {
            retained.insert(key, row);
            *model = Some(m);
        }
        Ok(index)
    }

    /// Routes by new calibration from now on: `spec` and centroids `[members, dim]` in member
    /// order. Loads, health and membership stay; rows kept for removed members are dropped (they
    /// belong to the old space).
    pub fn load_centroids(&self, spec: SignatureSpec, data: &[f32], rows: usize, cols: usize) -> Result<()> {
        if self.band.is_none() {
            return Err(RouterError::NoLocality("load_centroids"));
        }
        let mut st = self.lock();
        let members = st.fleet.len();
        if rows != members {
            return Err(RouterError::Shape {
                arg: "centroids",
                expected: format!("[{members}, {}] (one row per decoder)", spec.dim()),
                got: format!("[{rows}, {cols}]"),
            });
        }
        let model = LocalityModel::with_precision(spec, Centroids::new(data, rows, cols)?, self.precision)?;
        st.model = Some(Arc::new(model));
        st.retained.clear();
        Ok(())
    }

    /// Replaces the centroids (`[members, dim]`, same geometry) in one step; row k is member k.
    /// With `fitted_for`, refuses ([`RouterError::StaleMembership`]) if the members are no longer
    /// those ids, so a refit computed while membership changed is never applied to the wrong rows.
    pub fn swap_centroids(&self, data: &[f32], rows: usize, cols: usize, fitted_for: Option<&[WorkerId]>) -> Result<()> {
        let mut st = self.lock();
        let current = st.model.clone().ok_or(RouterError::NoLocality("swap_centroids"))?;
        if let Some(ids) = fitted_for {
            if ids != st.fleet.ids() {
                return Err(RouterError::StaleMembership { expected: ids.to_vec(), actual: st.fleet.ids().to_vec() });
            }
        }
        let (w, d) = (st.fleet.len(), current.centroids().dim());
        if rows != w || cols != d {
            return Err(RouterError::Shape { arg: "centroids", expected: format!("[{w}, {d}]"), got: format!("[{rows}, {cols}]") });
        }
        st.model = Some(Arc::new(current.with_centroids(Centroids::new(data, rows, cols)?)?));
        Ok(())
    }

    /// Member ids and the unit centroids in use, `[members, dim]`, taken together.
    pub fn centroid_snapshot(&self) -> Result<(Vec<WorkerId>, Arc<LocalityModel>)> {
        let st = self.lock();
        let model = st.model.clone().ok_or(RouterError::NoLocality("centroids"))?;
        Ok((st.fleet.ids().to_vec(), model))
    }
}

/// Times `iters` pure `select` calls from raw counts, returning nanoseconds per call. Exposed
/// so the Python benchmark can measure the Rust core without the FFI boundary.
pub fn time_select<T: CountValue>(router: &Router, signal: Signal<T>, loads: &[i64], iters: usize) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        std::hint::black_box(router.select(std::hint::black_box(signal), loads, None)?);
        out.push(t.elapsed().as_nanos() as u64);
    }
    Ok(out)
}
