//! The locality model (signature geometry, unit centroids, their fixed-point copy) and the
//! scores it gives a request: certified estimates that a policy refines to exact values only
//! where a decision depends on them.
use crate::centroids::Centroids;
use crate::error::{Result, RouterError};
use crate::kernel::exact;
use crate::kernel::quant::{Precision, Quantized};
use crate::signature::{check_finite, CountValue, SignatureSpec};
use multiversion::multiversion;

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

/// Geometry + calibration transforms + unit centroids (+ their fixed-point copy).
#[derive(Debug, Clone)]
pub struct LocalityModel {
    spec: SignatureSpec,
    centroids: Centroids,
    precision: Precision,
    /// None with `Precision::Exact`, or when a weight is outside what the fixed point covers.
    quant: Option<Quantized>,
}

impl LocalityModel {
    pub fn new(spec: SignatureSpec, centroids: Centroids) -> Result<Self> {
        Self::with_precision(spec, centroids, Precision::Auto)
    }

    pub fn with_precision(spec: SignatureSpec, centroids: Centroids, precision: Precision) -> Result<Self> {
        if spec.dim() != centroids.dim() {
            return Err(RouterError::Shape {
                arg: "centroids",
                expected: format!("[W, {}] (kept layers × experts)", spec.dim()),
                got: format!("[{}, {}]", centroids.workers(), centroids.dim()),
            });
        }
        let quant = if precision == Precision::Exact {
            None
        } else {
            let idf: Vec<f32> = spec.kept().iter().flat_map(|&l| spec.idf_row(l).iter().copied()).collect();
            Quantized::new(centroids.rows(), &idf, centroids.workers(), spec.kept().len(), spec.experts(), precision)
        };
        Ok(Self { spec, centroids, precision, quant })
    }

    /// The same geometry over other centroids.
    pub fn with_centroids(&self, centroids: Centroids) -> Result<Self> {
        Self::with_precision(self.spec.clone(), centroids, self.precision)
    }

    pub fn spec(&self) -> &SignatureSpec {
        &self.spec
    }
    pub fn centroids(&self) -> &Centroids {
        &self.centroids
    }
    /// "int16", "int8" or "exact": how estimates are computed.
    pub fn kernel(&self) -> String {
        match &self.quant {
            Some(q) => format!("{} ({})", q.precision(), q.isa().name()),
            None => "exact".into(),
        }
    }

    /// Scores of `signal` into `buf`; `Ok(false)` when it carries no direction (absent, or a
    /// zero signature after IDF and the layer mask).
    pub(crate) fn score<T: CountValue>(&self, signal: Signal<T>, buf: &mut ScoreBuf) -> Result<bool> {
        let w = self.centroids.workers();
        match signal {
            Signal::Absent => Ok(false),
            Signal::Signature(sig) => {
                if sig.len() != self.centroids.dim() {
                    return Err(RouterError::Shape {
                        arg: "signature",
                        expected: format!("[{}]", self.centroids.dim()),
                        got: format!("[{}]", sig.len()),
                    });
                }
                check_finite("signature", sig)?;
                buf.x.clear();
                buf.x.extend(sig.iter().map(|&v| v as f64));
                if !buf.set_norm() {
                    return Ok(false);
                }
                buf.est.clear();
                buf.est.extend((0..w).map(|k| exact::dot(&buf.x, self.centroids.row(k)) / buf.norm));
                buf.rad.clear();
                buf.rad.resize(w, 0.0);
                Ok(true)
            }
            Signal::Counts { data, rows, cols } => {
                self.spec.check(data, rows, cols)?;
                match &self.quant {
                    Some(q) => self.estimate(q, data, buf),
                    None => self.exact_counts(data, buf),
                }
            }
        }
    }

    fn signature_of<T: CountValue>(&self, counts: &[T], x: &mut Vec<f64>) {
        let e = self.spec.experts();
        x.clear();
        x.resize(self.spec.dim(), 0.0);
        for (i, &l) in self.spec.kept().iter().enumerate() {
            weigh(&counts[l * e..(l + 1) * e], self.spec.idf_row(l), &mut x[i * e..(i + 1) * e]);
        }
    }

    fn exact_counts<T: CountValue>(&self, counts: &[T], buf: &mut ScoreBuf) -> Result<bool> {
        self.signature_of(counts, &mut buf.x);
        if !buf.set_norm() {
            return Ok(false);
        }
        let w = self.centroids.workers();
        buf.est.clear();
        buf.est.extend((0..w).map(|k| exact::dot(&buf.x, self.centroids.row(k)) / buf.norm));
        buf.rad.clear();
        buf.rad.resize(w, 0.0);
        Ok(true)
    }

    fn estimate<T: CountValue>(&self, q: &Quantized, counts: &[T], buf: &mut ScoreBuf) -> Result<bool> {
        let (e, epad, kept) = (self.spec.experts(), q.epad(), self.spec.kept());
        self.signature_of(counts, &mut buf.x);
        if !buf.set_norm() {
            return Ok(false);
        }
        buf.c16.clear();
        buf.c16.resize(kept.len() * epad, 0);
        buf.tmul.clear();
        buf.h.clear();
        buf.g.clear();
        let limit = q.count_limit();
        for (i, &l) in kept.iter().enumerate() {
            let c = &counts[l * e..(l + 1) * e];
            let (sum, max) = sum_max(c);
            // t = 2^m, the smallest with round(max / t) ≤ limit (m = 0 for all but huge prompts).
            let mut m = 0u32;
            while ((max as u128 + ((1u128 << m) >> 1)) >> m) > limit as u128 {
                m += 1;
            }
            narrow(c, m, &mut buf.c16[i * epad..][..e]);
            let t = (1u128 << m) as f64;
            buf.tmul.push(t as f32);
            // The 1e-12 covers the rounding of the f64 sum (an upper bound is all the bound needs).
            buf.h.push(sum / 2.0 * (1.0 + 1e-12));
            buf.g.push(if m == 0 { 0.0 } else { t / 2.0 });
        }
        q.estimate(&buf.c16, &buf.tmul, &mut buf.est32, &mut buf.abs32);
        if buf.est32.iter().chain(&buf.abs32).any(|v| !v.is_finite()) {
            return self.exact_counts(counts, buf); // weights so large the f32 estimate overflowed
        }
        let rule = exact::rule_error(self.centroids.dim());
        buf.est.clear();
        buf.rad.clear();
        for k in 0..self.centroids.workers() {
            buf.est.push(buf.est32[k] as f64 / buf.norm);
            let bound = q.quant_error(k, &buf.h, &buf.g) + q.rounding_error(buf.abs32[k]);
            buf.rad.push(bound / buf.norm * (1.0 + 1e-6) + rule);
        }
        Ok(true)
    }

    /// The scores a policy reads, refining through this model.
    pub(crate) fn scores<'a>(&'a self, buf: &'a mut ScoreBuf) -> Scores<'a> {
        Scores { est: &mut buf.est, rad: &mut buf.rad, source: Some((&buf.x, buf.norm, &self.centroids)), refined: 0 }
    }
}

/// x = c · idf, elementwise in f64.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn weigh<T: CountValue>(c: &[T], idf: &[f32], x: &mut [f64]) {
    for ((o, v), &w) in x.iter_mut().zip(c).zip(idf) {
        *o = v.as_f64() * w as f64;
    }
}

/// (Σ c, max c) of non-negative counts: integer lanes, the f64 sum only if u64 could wrap.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn sum_max<T: CountValue>(c: &[T]) -> (f64, u64) {
    let mut acc = [0u64; 8];
    let mut max = [0u64; 8];
    let mut chunks = c.chunks_exact(8);
    for ch in &mut chunks {
        for j in 0..8 {
            let v = ch[j].as_u64();
            acc[j] = acc[j].wrapping_add(v);
            max[j] = max[j].max(v);
        }
    }
    for (j, v) in chunks.remainder().iter().enumerate() {
        acc[j] = acc[j].wrapping_add(v.as_u64());
        max[j] = max[j].max(v.as_u64());
    }
    let max = max.into_iter().max().unwrap_or(0);
    if (max as u128) * (c.len() as u128) <= u64::MAX as u128 {
        (acc.iter().sum::<u64>() as f64, max)
    } else {
        (c.iter().map(|v| v.as_u64() as f64).sum(), max)
    }
}

/// round(c / 2^m) as int16 (the caller chose m so every value fits).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn narrow<T: CountValue>(c: &[T], m: u32, out: &mut [i16]) {
    if m == 0 {
        for (o, v) in out.iter_mut().zip(c) {
            *o = v.as_u64() as i16;
        }
    } else {
        let half = (1u128 << m) >> 1;
        for (o, v) in out.iter_mut().zip(c) {
            *o = ((v.as_u64() as u128 + half) >> m) as i16;
        }
    }
}

/// Per-thread working memory of one scoring.
#[derive(Default)]
pub(crate) struct ScoreBuf {
    x: Vec<f64>,
    norm: f64,
    c16: Vec<i16>,
    tmul: Vec<f32>,
    h: Vec<f64>,
    g: Vec<f64>,
    est32: Vec<f32>,
    abs32: Vec<f32>,
    est: Vec<f64>,
    rad: Vec<f64>,
}

impl ScoreBuf {
    /// Sets the norm of `x`; false for the zero vector.
    fn set_norm(&mut self) -> bool {
        self.norm = exact::sum_squares(&self.x).sqrt();
        self.norm > 0.0
    }
}

/// Each decoder's score as an interval `[est − rad, est + rad]` holding the exact score
/// (`rad = 0` once exact); [`exact`](Self::exact) computes and keeps the exact value.
pub struct Scores<'a> {
    est: &'a mut [f64],
    rad: &'a mut [f64],
    /// Signature, its norm and the centroids, to refine with (None: every score is exact).
    source: Option<(&'a [f64], f64, &'a Centroids)>,
    refined: usize,
}

impl<'a> Scores<'a> {
    /// Scores known exactly (`rad` all zero).
    pub fn fixed(est: &'a mut [f64], rad: &'a mut [f64]) -> Self {
        assert!(rad.iter().all(|&r| r == 0.0), "fixed scores have no error to refine");
        Self { est, rad, source: None, refined: 0 }
    }

    pub fn len(&self) -> usize {
        self.est.len()
    }
    pub fn is_empty(&self) -> bool {
        self.est.is_empty()
    }
    #[inline]
    pub fn lo(&self, k: usize) -> f64 {
        self.est[k] - self.rad[k]
    }
    #[inline]
    pub fn hi(&self, k: usize) -> f64 {
        self.est[k] + self.rad[k]
    }
    /// The exact score of decoder k: dot(signature, unit centroid) / ‖signature‖ in the rule's
    /// f64 order.
    pub fn exact(&mut self, k: usize) -> f64 {
        if self.rad[k] != 0.0 {
            let (x, norm, centroids) = self.source.expect("scores with an error bound have a source");
            self.est[k] = exact::dot(x, centroids.row(k)) / norm;
            self.rad[k] = 0.0;
            self.refined += 1;
        }
        self.est[k]
    }
    /// Every exact score.
    pub fn all_exact(&mut self) -> Vec<f64> {
        (0..self.len()).map(|k| self.exact(k)).collect()
    }
    /// How many scores were computed exactly after the estimate.
    pub fn refined(&self) -> usize {
        self.refined
    }
}
