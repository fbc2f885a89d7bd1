//! PyO3 binding of `eldr-router`, imported as `sglang_eldr.router_rs`. Inputs are borrowed
//! from numpy without copying (when C-contiguous) and the GIL is released while computing.
#![allow(non_snake_case)]

use eldr_router::{Centroids, LocalityModel, Receipt, Router as Core, RouterError, SignatureSpec, Signal};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn value_error(e: RouterError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Borrow a 1-D or 2-D numpy array as a slice, copying only when it is not C-contiguous.
macro_rules! borrowed {
    ($arr:expr, $owned:ident) => {
        match $arr.as_slice() {
            Ok(s) => s,
            Err(_) => {
                $owned = $arr.as_array().iter().copied().collect::<Vec<_>>();
                &$owned[..]
            }
        }
    };
}

/// Runs `$body` (GIL released) with `$sig: Signal<_>` built from a counts array of any integer
/// dtype, a float signature, or `None`.
macro_rules! with_signal {
    ($py:expr, $obj:expr, |$sig:ident| $body:expr) => {{
        let obj: Option<&Bound<'_, PyAny>> = $obj;
        match obj {
            None => {
                let $sig = Signal::<u8>::Absent;
                $py.detach(|| $body)
            }
            Some(o) if o.is_none() => {
                let $sig = Signal::<u8>::Absent;
                $py.detach(|| $body)
            }
            Some(o) => with_signal!(@counts $py, o, $sig, $body, i64 i32 i16 i8 u64 u32 u16 u8)
        }
    }};
    (@counts $py:expr, $o:expr, $sig:ident, $body:expr, $t:ident $($rest:ident)*) => {
        if let Ok(a) = $o.extract::<PyReadonlyArray2<'_, $t>>() {
            let (rows, cols) = (a.shape()[0], a.shape()[1]);
            let owned: Vec<$t>;
            let data = borrowed!(a, owned);
            let $sig = Signal::Counts { data, rows, cols };
            $py.detach(|| $body)
        } else {
            with_signal!(@counts $py, $o, $sig, $body, $($rest)*)
        }
    };
    (@counts $py:expr, $o:expr, $sig:ident, $body:expr, ) => {
        if let Ok(a) = $o.extract::<PyReadonlyArray1<'_, f32>>() {
            let owned: Vec<f32>;
            let data = borrowed!(a, owned);
            let $sig = Signal::<u8>::Signature(data);
            $py.detach(|| $body)
        } else if let Ok(a) = $o.extract::<PyReadonlyArray1<'_, f64>>() {
            let owned: Vec<f32> = a.as_array().iter().map(|&v| v as f32).collect();
            let $sig = Signal::<u8>::Signature(&owned);
            $py.detach(|| $body)
        } else {
            Err(RouterError::Invalid {
                arg: "counts_or_signature",
                reason: format!(
                    "expected a 2-D integer numpy array [layers, experts], a 1-D float numpy array [dim], or None; got {}",
                    describe($o)
                ),
            })
        }
    };
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

fn vec1<T: Copy + numpy::Element>(arr: &PyReadonlyArray1<'_, T>) -> Vec<T> {
    arr.as_array().iter().copied().collect()
}

/// A decode router: one policy, its own in-flight counters and health flags.
/// Build one with `LocalityBandRouter(...)` or `BaselineRouter(...)`.
#[pyclass(frozen, module = "sglang_eldr.router_rs")]
struct Router {
    core: Core,
}

fn receipt_dict<'py>(py: Python<'py>, r: Receipt, policy: &str) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("worker", r.worker)?;
    d.set_item("policy", policy)?;
    d.set_item("scores", r.scores)?;
    d.set_item("band", r.band)?;
    d.set_item("loads", r.loads)?;
    Ok(d)
}

#[pymethods]
impl Router {
    /// Policy name: eldr, rr, random, jsq or p2c.
    #[getter]
    fn policy(&self) -> &'static str {
        self.core.policy()
    }

    #[getter]
    fn num_workers(&self) -> usize {
        self.core.workers()
    }

    /// Starvation guard bound (eldr only; None when off).
    #[getter]
    fn max_imbalance(&self) -> Option<i64> {
        self.core.max_imbalance()
    }

    /// Locality band width (eldr only; None for baselines).
    #[getter]
    fn tau(&self) -> Option<f32> {
        self.core.tau()
    }

    /// Signature dimension D = kept layers × experts (eldr only).
    #[getter]
    fn dim(&self) -> PyResult<usize> {
        Ok(self.core.model().map_err(value_error)?.centroids().dim())
    }

    /// Expected counts shape (layers, experts) (eldr only).
    #[getter]
    fn counts_shape(&self) -> PyResult<(usize, usize)> {
        let m = self.core.model().map_err(value_error)?;
        Ok((m.spec().layers(), m.spec().experts()))
    }

    /// Pure locality-band choice for a signature float32[D] and loads int64[W].
    #[pyo3(signature = (signature, loads, healthy=None))]
    fn select(
        &self,
        py: Python<'_>,
        signature: &Bound<'_, PyAny>,
        loads: PyReadonlyArray1<'_, i64>,
        healthy: Option<PyReadonlyArray1<'_, bool>>,
    ) -> PyResult<usize> {
        self.select_any(py, signature, loads, healthy)
    }

    /// Pure locality-band choice from raw counts int[L,E] (signature built in Rust).
    #[pyo3(signature = (counts, loads, healthy=None))]
    fn select_counts(
        &self,
        py: Python<'_>,
        counts: &Bound<'_, PyAny>,
        loads: PyReadonlyArray1<'_, i64>,
        healthy: Option<PyReadonlyArray1<'_, bool>>,
    ) -> PyResult<usize> {
        self.select_any(py, counts, loads, healthy)
    }

    /// Cosine of a signature (float[D]) or counts (int[L,E]) to every centroid; zeros for a
    /// zero signature.
    fn scores<'py>(&self, py: Python<'py>, counts_or_signature: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let core = &self.core;
        let scores = with_signal!(py, Some(counts_or_signature), |sig| core.scores(sig)).map_err(value_error)?;
        Ok(PyArray1::from_vec(py, scores))
    }

    /// Chooses a decoder for a request and counts it in flight. Pass counts int[L,E], a
    /// signature float[D], or None (no signal: least-loaded for eldr; ignored by baselines).
    #[pyo3(signature = (counts_or_signature=None))]
    fn acquire(&self, py: Python<'_>, counts_or_signature: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
        let core = &self.core;
        with_signal!(py, counts_or_signature, |sig| core.acquire(sig)).map_err(value_error)
    }

    /// As `acquire`, returning {"worker", "policy", "scores", "band", "loads"} (loads before).
    #[pyo3(signature = (counts_or_signature=None))]
    fn acquire_with_receipt<'py>(
        &self,
        py: Python<'py>,
        counts_or_signature: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let core = &self.core;
        let r = with_signal!(py, counts_or_signature, |sig| core.acquire_with_receipt(sig)).map_err(value_error)?;
        receipt_dict(py, r, self.core.policy())
    }

    /// Ends one in-flight request on `worker`.
    fn release(&self, worker: usize) -> PyResult<()> {
        self.core.release(worker).map_err(value_error)
    }

    /// In-flight counts, int64[W].
    fn loads<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        PyArray1::from_vec(py, self.core.loads())
    }

    fn healthy(&self) -> Vec<bool> {
        self.core.healthy()
    }

    /// Marks a decoder (un)healthy; unhealthy decoders are never chosen.
    fn set_healthy(&self, worker: usize, healthy: bool) -> PyResult<()> {
        self.core.set_healthy(worker, healthy).map_err(value_error)
    }

    /// Sets all in-flight counts (int64[W]) and health flags at once (membership changes).
    fn restore_state(&self, loads: PyReadonlyArray1<'_, i64>, healthy: Vec<bool>) -> PyResult<()> {
        let owned: Vec<i64>;
        let data = borrowed!(loads, owned);
        self.core.restore_state(data, &healthy).map_err(value_error)
    }

    /// Atomically replaces the centroids float32[W,D]; row k stays decoder k.
    fn swap_centroids(&self, py: Python<'_>, centroids: PyReadonlyArray2<'_, f32>) -> PyResult<()> {
        let (rows, cols) = (centroids.shape()[0], centroids.shape()[1]);
        let owned: Vec<f32>;
        let data = borrowed!(centroids, owned);
        let core = &self.core;
        py.detach(|| core.swap_centroids(data, rows, cols)).map_err(value_error)
    }

    /// The unit centroids in use, float32[W,D].
    fn centroids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let m = self.core.model().map_err(value_error)?;
        let (w, d) = (m.centroids().workers(), m.centroids().dim());
        Ok(PyArray1::from_slice(py, m.centroids().rows()).reshape([w, d])?)
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
        let loads = vec1(&loads);
        let core = &self.core;
        let ns = with_signal!(py, Some(counts_or_signature), |sig| eldr_router::time_select(core, sig, &loads, iters))
            .map_err(value_error)?;
        Ok(PyArray1::from_vec(py, ns))
    }

    fn __repr__(&self) -> String {
        match self.core.tau() {
            Some(tau) => format!("Router(policy='eldr', workers={}, tau={tau})", self.core.workers()),
            None => format!("Router(policy='{}', workers={})", self.core.policy(), self.core.workers()),
        }
    }
}

impl Router {
    fn select_any(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        loads: PyReadonlyArray1<'_, i64>,
        healthy: Option<PyReadonlyArray1<'_, bool>>,
    ) -> PyResult<usize> {
        let owned_loads: Vec<i64>;
        let loads = borrowed!(loads, owned_loads);
        let healthy: Option<Vec<bool>> = healthy.as_ref().map(vec1);
        let core = &self.core;
        with_signal!(py, Some(x), |sig| core.select(sig, loads, healthy.as_deref())).map_err(value_error)
    }
}

/// ELDR locality-band router over W decoders.
///
/// centroids: float32[W, D]; tau: band width (>= 0; 0 = pure locality, 1 = pure least-loaded);
/// idf: float32[L, E] or None (all ones); layer_mask: bool[L] or None (all layers); layers: L
/// when neither idf nor layer_mask is given (default 1, i.e. counts of shape [1, D]);
/// max_imbalance: starvation guard — never choose a decoder whose in-flight count exceeds the
/// least-loaded healthy decoder's by more than this (None: no guard).
#[pyfunction]
#[pyo3(signature = (centroids, tau, idf=None, layer_mask=None, layers=None, max_imbalance=None))]
fn LocalityBandRouter(
    py: Python<'_>,
    centroids: PyReadonlyArray2<'_, f32>,
    tau: f64,
    idf: Option<PyReadonlyArray2<'_, f32>>,
    layer_mask: Option<PyReadonlyArray1<'_, bool>>,
    layers: Option<usize>,
    max_imbalance: Option<i64>,
) -> PyResult<Router> {
    let (w, d) = (centroids.shape()[0], centroids.shape()[1]);
    let cent_owned: Vec<f32>;
    let cent = borrowed!(centroids, cent_owned);
    let mask: Option<Vec<bool>> = layer_mask.as_ref().map(vec1);
    let idf_dims = idf.as_ref().map(|a| (a.shape()[0], a.shape()[1]));
    let idf_vec: Option<Vec<f32>> = idf.as_ref().map(|a| a.as_array().iter().copied().collect());
    let (l, e) = match (idf_dims, &mask) {
        (Some(dims), _) => dims,
        (None, mask) => {
            let l = mask.as_ref().map(Vec::len).or(layers).unwrap_or(1);
            let kept = mask.as_ref().map(|m| m.iter().filter(|k| **k).count()).unwrap_or(l);
            if kept == 0 || d % kept != 0 {
                return Err(PyValueError::new_err(format!(
                    "centroids: dimension {d} is not a multiple of the {kept} kept layer(s); pass idf to fix the geometry"
                )));
            }
            (l, d / kept)
        }
    };
    py.detach(|| {
        let spec = SignatureSpec::new(l, e, idf_vec.as_deref(), mask.as_deref())?;
        let model = LocalityModel::new(spec, Centroids::new(cent, w, d)?)?;
        Core::locality_guarded(model, tau, max_imbalance)
    })
    .map(|core| Router { core })
    .map_err(value_error)
}

/// A load-only baseline router: policy in {"rr", "random", "jsq", "p2c"}; seed drives random
/// and p2c.
#[pyfunction]
#[pyo3(signature = (policy, num_workers, seed=0))]
fn BaselineRouter(policy: &str, num_workers: usize, seed: u64) -> PyResult<Router> {
    Core::baseline(policy, num_workers, seed).map(|core| Router { core }).map_err(value_error)
}

#[pymodule]
fn router_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Router>()?;
    m.add_function(wrap_pyfunction!(LocalityBandRouter, m)?)?;
    m.add_function(wrap_pyfunction!(BaselineRouter, m)?)?;
    m.add("BASELINES", eldr_router::policy::BASELINES.to_vec())?;
    Ok(())
}
