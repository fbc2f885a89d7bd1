//! PyO3 binding of `eldr-router`, imported as `sglang_eldr.router_rs` (types in
//! `sglang_eldr/router_rs.pyi`). Arrays are borrowed from numpy without copying when
//! C-contiguous, and the GIL is released while Rust computes.
use std::borrow::Cow;


use eldr_router::policy::{ExpertGeometry, LocalityBand, StepCost, DEFAULT_SHARPNESS};
use eldr_router::{
    Precision, Receipt, Router as Core, RouterError, SignatureSpec, Signal,
    DEFAULT_BREAKER_FAILURES,
};
use numpy::ndarray::Dimension;
use numpy::{Element, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::PyClassInitializer;
use pyo3::types::PyDict;

fn value_error(e: RouterError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The array's data in C order: borrowed when contiguous, copied otherwise.
fn slice<'a, T: Element + Copy, D: Dimension>(a: &'a PyReadonlyArray<'_, T, D>) -> Cow<'a, [T]> {
    match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

/// What a request carries: counts `[layers, experts]` of any integer dtype (int32 first: the
/// engine sends int32), a float signature `[dim]`, or nothing.
#[derive(FromPyObject)]
enum Input<'py> {
    I32(PyReadonlyArray2<'py, i32>),
    I64(PyReadonlyArray2<'py, i64>),
    U32(PyReadonlyArray2<'py, u32>),
    U64(PyReadonlyArray2<'py, u64>),
    I16(PyReadonlyArray2<'py, i16>),
    U16(PyReadonlyArray2<'py, u16>),
    I8(PyReadonlyArray2<'py, i8>),
    U8(PyReadonlyArray2<'py, u8>),
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
}

fn input<'py>(obj: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Input<'py>>> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => o.extract::<Input>().map(Some).map_err(|_| {
            value_error(RouterError::Invalid {
                arg: "counts_or_signature",
                reason: format!(
                    "expected a 2-D integer numpy array [layers, experts], a 1-D float numpy array [dim], or None; got {}",
                    describe(o)
                ),
            })
        }),
    }
}

fn describe(o: &Bound<'_, PyAny>) -> String {
    match o.getattr("dtype").and_then(|d| d.str()) {
        Ok(dtype) => format!(
            "an array of dtype {} with {} dimension(s)",
            dtype,
            o.getattr("ndim").map(|n| n.to_string()).unwrap_or_default()
        ),
        Err(_) => format!("an object of type {}", o.get_type().name().map(|n| n.to_string()).unwrap_or_default()),
    }
}

/// Runs `$body` with the GIL released and `$sig` bound to the request's `Signal`.
macro_rules! with_signal {
    ($py:expr, $input:expr, |$sig:ident| $body:expr) => {{
        macro_rules! counts {
            ($a:expr) => {{
                let (rows, cols) = ($a.shape()[0], $a.shape()[1]);
                let data = slice($a);
                let $sig = Signal::Counts { data: &data, rows, cols };
                $py.detach(|| $body)
            }};
        }
        match $input {
            None => {
                let $sig = Signal::<u8>::Absent;
                $py.detach(|| $body)
            }
            Some(Input::I32(a)) => counts!(&a),
            Some(Input::I64(a)) => counts!(&a),
            Some(Input::U32(a)) => counts!(&a),
            Some(Input::U64(a)) => counts!(&a),
            Some(Input::I16(a)) => counts!(&a),
            Some(Input::U16(a)) => counts!(&a),
            Some(Input::I8(a)) => counts!(&a),
            Some(Input::U8(a)) => counts!(&a),
            Some(Input::F32(a)) => {
                let data = slice(&a);
                let $sig = Signal::<u8>::Signature(&data);
                $py.detach(|| $body)
            }
            Some(Input::F64(a)) => {
                let data: Vec<f32> = a.as_array().iter().map(|&v| v as f32).collect();
                let $sig = Signal::<u8>::Signature(&data);
                $py.detach(|| $body)
            }
        }
    }};
}

fn precision(name: &str) -> PyResult<Precision> {
    Ok(match name {
        "auto" => Precision::Auto,
        "int16" => Precision::Int16,
        "int8" => Precision::Int8,
        "exact" => Precision::Exact,
        other => {
            return Err(PyValueError::new_err(format!(
                "precision: unknown {other:?} (expected auto, int16, int8 or exact)"
            )))
        }
    })
}

fn keys_for(keys: Option<Vec<String>>, num_workers: Option<usize>, what: &str) -> PyResult<Vec<String>> {
    match (keys, num_workers) {
        (Some(k), Some(n)) if k.len() != n => Err(PyValueError::new_err(format!(
            "keys: {} keys given for num_workers={n}",
            k.len()
        ))),
        (Some(k), _) => Ok(k),
        (None, Some(n)) => Ok((0..n).map(|i| i.to_string()).collect()),
        (None, None) => Err(PyValueError::new_err(format!("{what}: give num_workers or keys"))),
    }
}

/// A decode router: the decoder set (membership, in-flight counts, health, breaker counts) and
/// one policy. Build one with `LocalityBandRouter(...)` or `BaselineRouter(...)`.
#[pyclass(frozen, subclass, module = "sglang_eldr.router_rs")]
struct Router {
    core: Core,
}

fn receipt_dict<'py>(py: Python<'py>, r: Receipt, policy: &str) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("worker", r.worker)?;
    d.set_item("id", r.id)?;
    d.set_item("policy", policy)?;
    d.set_item("scores", r.scores)?;
    d.set_item("score_error", r.score_error)?;
    d.set_item("band", r.band)?;
    d.set_item("loads", r.loads)?;
    d.set_item("ticket", r.ticket)?;
    d.set_item("costs", r.costs)?;
    Ok(d)
}

/// IDF `[L, E]` and layer mask `[L]` (each optional) as a signature geometry for dimension `dim`.
fn spec_for(
    dim: usize,
    idf: Option<&PyReadonlyArray2<'_, f32>>,
    layer_mask: Option<&PyReadonlyArray1<'_, bool>>,
    layers: Option<usize>,
) -> PyResult<SignatureSpec> {
    let mask: Option<Cow<[bool]>> = layer_mask.map(slice);
    let (l, e) = match (idf, &mask) {
        (Some(a), _) => (a.shape()[0], a.shape()[1]),
        (None, mask) => {
            let l = mask.as_ref().map(|m| m.len()).or(layers).unwrap_or(1);
            let kept = mask.as_ref().map(|m| m.iter().filter(|k| **k).count()).unwrap_or(l);
            if kept == 0 || dim % kept != 0 {
                return Err(PyValueError::new_err(format!(
                    "centroids: dimension {dim} is not a multiple of the {kept} kept layer(s); pass idf to fix the geometry"
                )));
            }
            (l, dim / kept)
        }
    };
    let idf_data = idf.map(slice);
    SignatureSpec::new(l, e, idf_data.as_deref(), mask.as_deref()).map_err(value_error)
}

#[pymethods]
impl Router {
    /// Policy name: eldr, rr, random, jsq or p2c.
    #[getter]
    fn policy(&self) -> &'static str {
        self.core.policy()
    }

    /// Number of members (decoders).
    #[getter]
    fn num_workers(&self) -> usize {
        self.core.workers()
    }

    /// Starvation guard bound (eldr only; None when off).
    #[getter]
    fn max_imbalance(&self) -> Option<i64> {
        self.core.max_imbalance()
    }

    /// Relative starvation guard: the allowance is max(max_imbalance, ⌊this · mean in-flight⌋)
    /// (eldr only; 0 = absolute guard).
    #[getter]
    fn imbalance_fraction(&self) -> Option<f64> {
        self.core.imbalance_fraction()
    }

    /// Locality band width (eldr only; None for baselines).
    #[getter]
    fn tau(&self) -> Option<f64> {
        self.core.tau()
    }

    /// Whether centroids are loaded (eldr; always False for baselines).
    #[getter]
    fn has_centroids(&self) -> bool {
        self.core.has_centroids()
    }

    /// How scores are estimated: "int16 (avx512-vnni)", "int8+residual (avx512-vnni)", "exact", ….
    #[getter]
    fn kernel(&self) -> PyResult<String> {
        Ok(self.core.model().map_err(value_error)?.kernel())
    }

    /// Signature dimension D = kept layers × experts (eldr with centroids only).
    #[getter]
    fn dim(&self) -> PyResult<usize> {
        Ok(self.core.model().map_err(value_error)?.centroids().dim())
    }

    /// Expected counts shape (layers, experts) (eldr with centroids only).
    #[getter]
    fn counts_shape(&self) -> PyResult<(usize, usize)> {
        let m = self.core.model().map_err(value_error)?;
        Ok((m.spec().layers(), m.spec().experts()))
    }

    /// Pure locality-band choice (a member index) for counts int[L,E] or a signature float[D],
    /// loads int64[W] and optional health bool[W].
    #[pyo3(signature = (counts_or_signature, loads, healthy=None))]
    fn select(
        &self,
        py: Python<'_>,
        counts_or_signature: &Bound<'_, PyAny>,
        loads: PyReadonlyArray1<'_, i64>,
        healthy: Option<PyReadonlyArray1<'_, bool>>,
    ) -> PyResult<usize> {
        let x = input(Some(counts_or_signature))?;
        let loads = slice(&loads);
        let healthy = healthy.as_ref().map(slice);
        let core = &self.core;
        with_signal!(py, x, |sig| core.select(sig, &loads, healthy.as_deref())).map_err(value_error)
    }

    /// Same as `select` (kept for callers that pass counts).
    #[pyo3(signature = (counts, loads, healthy=None))]
    fn select_counts(
        &self,
        py: Python<'_>,
        counts: &Bound<'_, PyAny>,
        loads: PyReadonlyArray1<'_, i64>,
        healthy: Option<PyReadonlyArray1<'_, bool>>,
    ) -> PyResult<usize> {
        self.select(py, counts, loads, healthy)
    }

    /// Exact cosine of counts (int[L,E]) or a signature (float[D]) to every centroid, float64[W];
    /// zeros for a zero signature.
    fn scores<'py>(&self, py: Python<'py>, counts_or_signature: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let x = input(Some(counts_or_signature))?;
        let core = &self.core;
        let scores = with_signal!(py, x, |sig| core.scores(sig)).map_err(value_error)?;
        Ok(PyArray1::from_vec(py, scores))
    }

    /// Chooses a decoder and counts the request in flight on it; returns the member's id.
    /// Pass counts int[L,E], a signature float[D], or None (no signal: least-loaded for eldr;
    /// ignored by baselines).
    #[pyo3(signature = (counts_or_signature=None))]
    fn acquire(&self, py: Python<'_>, counts_or_signature: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
        let x = input(counts_or_signature)?;
        let core = &self.core;
        with_signal!(py, x, |sig| core.acquire(sig)).map_err(value_error)
    }

    /// As `acquire`, returning {"worker" (index), "id", "policy", "scores", "score_error",
    /// "band", "loads" (before this request), "ticket", "costs"}. `scores` are exact where the
    /// decision computed them, else certified estimates, each within `score_error` of exact (the
    /// decision is the exact rule's either way; `scores()` gives every exact value).
    #[pyo3(signature = (counts_or_signature=None))]
    fn acquire_with_receipt<'py>(
        &self,
        py: Python<'py>,
        counts_or_signature: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let x = input(counts_or_signature)?;
        let core = &self.core;
        let r = with_signal!(py, x, |sig| core.acquire_with_receipt(sig)).map_err(value_error)?;
        receipt_dict(py, r, self.core.policy())
    }

    /// Ends one in-flight request on member `worker_id`; False when that member was removed
    /// meanwhile (then only its retired count drops). The marginal policy needs the receipt's
    /// `ticket` as well.
    #[pyo3(signature = (worker_id, ticket=None))]
    fn release(&self, worker_id: u64, ticket: Option<u64>) -> PyResult<bool> {
        match ticket {
            None => self.core.release(worker_id).map_err(value_error),
            Some(t) => self.core.release_ticket(worker_id, t).map_err(value_error),
        }
    }

    /// Marginal policy: fixes the MoE shape (layers, experts, top_k) its frequencies need (once).
    fn set_geometry(&self, layers: usize, experts: usize, top_k: usize) -> PyResult<()> {
        let g = ExpertGeometry::new(layers, experts, top_k).map_err(value_error)?;
        self.core.set_geometry(g).map_err(value_error)
    }

    /// Marginal policy: (layers, experts, top_k), None until set (and for other policies).
    #[getter]
    fn geometry(&self) -> Option<(usize, usize, usize)> {
        self.core.geometry().map(|g| (g.layers, g.experts, g.top_k))
    }

    /// Marginal policy: the step cost (a, b, c) it predicts with (None for other policies).
    #[getter]
    fn step_cost(&self) -> Option<(f64, f64, f64)> {
        self.core.step_cost().map(|c| (c.a, c.b, c.c))
    }

    /// Marginal policy: requests in flight at which a decoder is passed over while another has room
    /// (None: no cap, and for other policies).
    #[getter]
    fn batch_cap(&self) -> Option<u32> {
        self.core.batch_cap()
    }

    /// Marginal policy: the sharpness γ of its expected frequencies, q ∝ counts^γ (None for other
    /// policies).
    #[getter]
    fn sharpness(&self) -> Option<f64> {
        self.core.sharpness()
    }

    /// Marginal policy: expected distinct (layer, expert) pairs per decode step of each member's
    /// running requests (None for other policies).
    fn expected_distinct(&self) -> Option<Vec<f64>> {
        self.core.expected_distinct()
    }

    /// Counts a request in flight on member `worker_id`, chosen outside the policy.
    fn hold(&self, worker_id: u64) -> PyResult<()> {
        self.core.hold(worker_id).map_err(value_error)
    }

    /// Requests in flight on member (or removed member) `worker_id`.
    fn in_flight(&self, worker_id: u64) -> i64 {
        self.core.in_flight(worker_id)
    }

    /// In-flight counts in member order, int64[W].
    fn loads<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_vec(py, self.core.loads())
    }

    /// Health flags in member order.
    fn healthy(&self) -> Vec<bool> {
        self.core.healthy()
    }

    /// Member ids in member order.
    fn ids(&self) -> Vec<u64> {
        self.core.ids()
    }

    /// [{"id", "key", "in_flight", "healthy", "failures"}] in member order.
    fn members<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.core
            .members()
            .into_iter()
            .map(|m| {
                let d = PyDict::new(py);
                d.set_item("id", m.id)?;
                d.set_item("key", m.key)?;
                d.set_item("in_flight", m.load)?;
                d.set_item("healthy", m.healthy)?;
                d.set_item("failures", m.failures)?;
                Ok(d)
            })
            .collect()
    }

    /// Marks a member (un)healthy by hand; unhealthy members are never chosen. Returns whether
    /// that changed its health.
    fn set_healthy(&self, worker_id: u64, healthy: bool) -> PyResult<bool> {
        self.core.set_healthy(worker_id, healthy).map_err(value_error)
    }

    /// One circuit-breaker observation (a health check or a request outcome): a success puts
    /// the member back, `breaker_failures` failures in a row take it out. Returns the new health
    /// when it changed, else None.
    fn report(&self, worker_id: u64, ok: bool) -> PyResult<Option<bool>> {
        self.core.report(worker_id, ok).map_err(value_error)
    }

    /// Adds a member under `key` (appended; returns its new id). With centroids it gets its old
    /// row back if `key` was removed before, else the mean direction of the others.
    #[pyo3(signature = (key, healthy=true))]
    fn add(&self, key: &str, healthy: bool) -> PyResult<u64> {
        self.core.add(key, healthy).map_err(value_error)
    }

    /// Removes a member (later indices shift down); returns its old index.
    fn remove(&self, worker_id: u64) -> PyResult<usize> {
        self.core.remove(worker_id).map_err(value_error)
    }

    /// Routes by new calibration: centroids float32[W,D] (row k is member k), idf float32[L,E]
    /// or None, layer_mask bool[L] or None. Loads, health and membership stay.
    #[pyo3(signature = (centroids, idf=None, layer_mask=None, layers=None))]
    fn load_centroids(
        &self,
        py: Python<'_>,
        centroids: PyReadonlyArray2<'_, f32>,
        idf: Option<PyReadonlyArray2<'_, f32>>,
        layer_mask: Option<PyReadonlyArray1<'_, bool>>,
        layers: Option<usize>,
    ) -> PyResult<()> {
        let (w, d) = (centroids.shape()[0], centroids.shape()[1]);
        let spec = spec_for(d, idf.as_ref(), layer_mask.as_ref(), layers)?;
        let data = slice(&centroids);
        let core = &self.core;
        py.detach(|| core.load_centroids(spec, &data, w, d)).map_err(value_error)
    }

    /// Replaces the centroids float32[W,D] in one step (same geometry; row k stays member k).
    /// `fitted_for`: the member ids the rows were fitted for; refused if membership changed since.
    #[pyo3(signature = (centroids, fitted_for=None))]
    fn swap_centroids(&self, py: Python<'_>, centroids: PyReadonlyArray2<'_, f32>, fitted_for: Option<Vec<u64>>) -> PyResult<()> {
        let (rows, cols) = (centroids.shape()[0], centroids.shape()[1]);
        let data = slice(&centroids);
        let core = &self.core;
        py.detach(|| core.swap_centroids(&data, rows, cols, fitted_for.as_deref())).map_err(value_error)
    }

    /// The unit centroids in use, float32[W,D].
    fn centroids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        Ok(self.centroid_snapshot(py)?.1)
    }

    /// (member ids, unit centroids float32[W,D]) read together.
    fn centroid_snapshot<'py>(&self, py: Python<'py>) -> PyResult<(Vec<u64>, Bound<'py, PyArray2<f32>>)> {
        let (ids, m) = self.core.centroid_snapshot().map_err(value_error)?;
        let (w, d) = (m.centroids().workers(), m.centroids().dim());
        Ok((ids, PyArray1::from_slice(py, m.centroids().rows()).reshape([w, d])?))
    }

    /// Benchmark support: times `iters` pure selections inside Rust (no FFI per call) and
    /// returns nanoseconds per call, uint64[iters].
    fn _bench_select<'py>(
        &self,
        py: Python<'py>,
        counts_or_signature: &Bound<'py, PyAny>,
        loads: PyReadonlyArray1<'py, i64>,
        iters: usize,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let x = input(Some(counts_or_signature))?;
        let loads = slice(&loads);
        let core = &self.core;
        let ns = with_signal!(py, x, |sig| eldr_router::time_select(core, sig, &loads, iters)).map_err(value_error)?;
        Ok(PyArray1::from_vec(py, ns))
    }

    fn __repr__(&self) -> String {
        match self.core.tau() {
            Some(tau) => format!("Router(policy='eldr', workers={}, tau={tau})", self.core.workers()),
            None => format!("Router(policy='{}', workers={})", self.core.policy(), self.core.workers()),
        }
    }
}

/// ELDR locality-band router.
///
/// centroids: float32[W, D] (one member per row, keyed by `keys` or "0".."W-1"), or None to
/// start without (least-loaded until `load_centroids`; then give `keys` or `num_workers`);
/// tau: band width (>= 0; 0 = pure locality, 1 = pure least-loaded); idf: float32[L, E] or None
/// (all ones); layer_mask: bool[L] or None (all layers); layers: L when neither idf nor
/// layer_mask is given (default 1, i.e. counts of shape [1, D]); max_imbalance: starvation guard
/// (never choose a decoder whose in-flight count exceeds the least-loaded healthy decoder's by
/// more than this; None: no guard); imbalance_fraction: make that allowance
/// max(max_imbalance, ⌊imbalance_fraction · mean in-flight⌋) (0: absolute); breaker_failures: consecutive failed reports that take a
/// member out; precision: "auto" (exact below 512 dimensions, else int16, int8 first with an int8 residual row for each open decoder above 32 K weights (W × D) on AVX-512 VNNI or 32 M elsewhere), "int16", "int8" (that two-level table) or "exact".
#[pyclass(frozen, extends = Router, module = "sglang_eldr.router_rs")]
struct LocalityBandRouter;

#[pymethods]
impl LocalityBandRouter {
    #[new]
    #[pyo3(signature = (centroids=None, tau=0.1, idf=None, layer_mask=None, layers=None, max_imbalance=None,
                        keys=None, num_workers=None, breaker_failures=DEFAULT_BREAKER_FAILURES, precision="auto",
                        imbalance_fraction=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        centroids: Option<PyReadonlyArray2<'_, f32>>,
        tau: f64,
        idf: Option<PyReadonlyArray2<'_, f32>>,
        layer_mask: Option<PyReadonlyArray1<'_, bool>>,
        layers: Option<usize>,
        max_imbalance: Option<i64>,
        keys: Option<Vec<String>>,
        num_workers: Option<usize>,
        breaker_failures: u32,
        precision: &str,
        imbalance_fraction: f64,
    ) -> PyResult<PyClassInitializer<Self>> {
        let precision = self::precision(precision)?;
        let band = LocalityBand::with_relative_guard(tau, max_imbalance, imbalance_fraction).map_err(value_error)?;
        let workers = num_workers.or(centroids.as_ref().map(|c| c.shape()[0]));
        let keys = keys_for(keys, workers, "LocalityBandRouter")?;
        let core = Core::locality(&keys, band, precision, breaker_failures).map_err(value_error)?;
        let router = Router { core };
        if let Some(c) = centroids {
            router.load_centroids(py, c, idf, layer_mask, layers)?;
        }
        Ok(PyClassInitializer::from(router).add_subclass(LocalityBandRouter))
    }
}

/// A load-only baseline router: policy in {"rr", "random", "jsq", "p2c"} over `num_workers`
/// members (or members `keys`); seed drives random and p2c.
#[pyclass(frozen, extends = Router, module = "sglang_eldr.router_rs")]
struct BaselineRouter;

#[pymethods]
impl BaselineRouter {
    #[new]
    #[pyo3(signature = (policy, num_workers=None, seed=0, keys=None, breaker_failures=DEFAULT_BREAKER_FAILURES))]
    fn new(policy: &str, num_workers: Option<usize>, seed: u64, keys: Option<Vec<String>>, breaker_failures: u32) -> PyResult<PyClassInitializer<Self>> {
        let keys = keys_for(keys, num_workers, "BaselineRouter")?;
        let core = Core::baseline(policy, &keys, seed, breaker_failures).map_err(value_error)?;
        Ok(PyClassInitializer::from(Router { core }).add_subclass(BaselineRouter))
    }
}

/// The marginal-cost policy (`eldr_router::policy::MarginalCost`): each request goes to the
/// decoder where it adds the least predicted decode time under the step cost
/// `a + b·batch + c·distinct (layer, expert) pairs`. Members as for the other routers; the MoE
/// shape now (layers, experts, top_k) or later (`set_geometry`); release with the receipt's ticket.
#[pyclass(frozen, extends = Router, module = "sglang_eldr.router_rs")]
struct MarginalCostRouter;

#[pymethods]
impl MarginalCostRouter {
    #[new]
    #[pyo3(signature = (a=0.0, b=0.0, c=1.0, num_workers=None, keys=None, layers=None, experts=None, top_k=None,
                        breaker_failures=DEFAULT_BREAKER_FAILURES, batch_cap=None, sharpness=DEFAULT_SHARPNESS))]
    #[allow(clippy::too_many_arguments)]
    fn new(a: f64, b: f64, c: f64, num_workers: Option<usize>, keys: Option<Vec<String>>, layers: Option<usize>,
           experts: Option<usize>, top_k: Option<usize>, breaker_failures: u32,
           batch_cap: Option<u32>, sharpness: f64) -> PyResult<PyClassInitializer<Self>> {
        let keys = keys_for(keys, num_workers, "MarginalCostRouter")?;
        let geometry = match (layers, experts, top_k) {
            (Some(l), Some(e), Some(k)) => Some(ExpertGeometry::new(l, e, k).map_err(value_error)?),
            (None, None, None) => None,
            _ => return Err(PyValueError::new_err("MarginalCostRouter: give layers, experts and top_k together, or none")),
        };
        let core = Core::marginal(&keys, StepCost { a, b, c }, geometry, breaker_failures).map_err(value_error)?;
        core.set_batch_cap(batch_cap).map_err(value_error)?;
        core.set_sharpness(sharpness).map_err(value_error)?;
        Ok(PyClassInitializer::from(Router { core }).add_subclass(MarginalCostRouter))
    }
}

#[pymodule]
fn router_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Router>()?;
    m.add_class::<LocalityBandRouter>()?;
    m.add_class::<BaselineRouter>()?;
    m.add_class::<MarginalCostRouter>()?;
    m.add("BASELINES", eldr_router::policy::BASELINES.to_vec())?;
    m.add("DEFAULT_BREAKER_FAILURES", DEFAULT_BREAKER_FAILURES)?;
    m.add("DEFAULT_SHARPNESS", DEFAULT_SHARPNESS)?;
    Ok(())
}
