//! The locality model (signature geometry, unit centroids, their fixed-point copy) and the
//! scores it gives a request: certified estimates that a policy refines to exact values only
//! where a decision depends on them.
use crate::centroids::Centroids;
use crate::error::{Result, RouterError};
use crate::kernel::{self, exact};
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

/// Signature dimensions below which `Precision::Auto` scores exactly.
pub const SMALL_DIM: usize = 512;

/// Geometry + calibration transforms + unit centroids (+ their fixed-point copy).
#[derive(Debug, Clone)]
pub struct LocalityModel {
    spec: SignatureSpec,
    centroids: Centroids,
    precision: Precision,
    /// None with `Precision::Exact`, or when a weight is outside what the fixed point covers.
    quant: Option<Quantized>,
    /// The kept layers' IDF as f64, `[kept][experts]`.
    idf64: Vec<f64>,
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
        // Below SMALL_DIM the exact rule alone is faster than estimating first (criterion).
        let quant = if precision == Precision::Exact || (precision == Precision::Auto && spec.dim() < SMALL_DIM) {
            None
        } else {
            let idf: Vec<f32> = spec.kept().iter().flat_map(|&l| spec.idf_row(l).iter().copied()).collect();
            Quantized::new(centroids.rows(), &idf, centroids.workers(), spec.kept().len(), spec.experts(), precision)
        };
        let idf64 = spec.kept().iter().flat_map(|&l| spec.idf_row(l).iter().map(|&v| v as f64)).collect();
        Ok(Self { spec, centroids, precision, quant, idf64 })
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
                match &self.quant {
                    Some(q) => {
                        self.spec.check_shape(data, rows, cols)?;
                        self.estimate(q, data, buf)
                    }
                    None => {
                        self.spec.check(data, rows, cols)?;
                        self.exact_counts(data, buf)
                    }
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
        let dim = self.spec.dim();
        // The padding lanes stay zero: only the first `e` of each layer are written below.
        if buf.c16_shape != (e, epad, kept.len()) {
            buf.c16.clear();
            buf.c16.resize(kept.len() * epad, 0);
            buf.c16_shape = (e, epad, kept.len());
        }
        buf.tmul.clear();
        buf.h.clear();
        buf.g.clear();
        buf.r.clear();
        // One pass per layer gives the rule's norm (x itself is built only if a score is
        // refined), the int16 counts, Σ c and max c.
        let mut squares = [0.0f64; exact::LANES];
        let limit = q.count_limit();
        let mut offset = 0;
        let mut negative = self.spec.dropped_negative(counts);
        for (i, &l) in kept.iter().enumerate() {
            let c = &counts[l * e..(l + 1) * e];
            let c16 = &mut buf.c16[i * epad..][..e];
            let idf = &self.idf64[i * e..][..e];
            let fast = T::as_i32s(c).and_then(|c32| kernel::prepare_i32(q.isa(), c32, idf, offset, &mut squares, c16));
            let (sum16, min16, max16) = fast.unwrap_or_else(|| prepare_layer(c, idf, offset, &mut squares, c16));
            negative |= min16 < 0;
            if negative {
                continue;
            }
            offset = (offset + e) % exact::LANES;
            // t = 2^m, the smallest with round(max / t) ≤ limit: m = 0 for all but huge prompts,
            // and then nothing was clamped and the int16 sums are the counts' own.
            let mut m = 0u32;
            let mut sum = sum16 as f64;
            if max16 as u64 > limit || max16 == i16::MAX {
                let max = c.iter().fold(0u64, |a, v| a.max(v.as_u64()));
                while ((max as u128 + ((1u128 << m) >> 1)) >> m) > limit as u128 {
                    m += 1;
                }
                sum = c.iter().map(|v| v.as_f64()).sum();
            }
            let t = (1u128 << m) as f64;
            let narrowed = if m == 0 { sum } else { narrow(c, m, c16) };
            buf.tmul.push(t as f32);
            // The 1e-12 covers the rounding of the f64 sums (an upper bound is all the bound needs).
            buf.h.push(sum / 2.0 * (1.0 + 1e-12));
            buf.g.push(if m == 0 { 0.0 } else { t / 2.0 });
            buf.r.push(q.rounding() * t * narrowed * (1.0 + 1e-12));
        }
        self.spec.check_sign(counts, negative)?;
        buf.norm = exact::reduce(squares).sqrt();
        buf.x_ready = false;
        if buf.norm == 0.0 {
            return Ok(false);
        }
        q.estimate(&buf.c16, &buf.tmul, &mut buf.est32);
        if buf.est32.iter().any(|v| !v.is_finite()) {
            return self.exact_counts(counts, buf); // weights so large the f32 estimate overflowed
        }
        let rule = exact::rule_error(dim);
        buf.est.clear();
        buf.rad.clear();
        q.error_bounds(&buf.h, &buf.g, &buf.r, &mut buf.bound);
        for k in 0..self.centroids.workers() {
            buf.est.push(buf.est32[k] as f64 / buf.norm);
            // 1e-300: the estimate's f32 terms may underflow by up to one subnormal step each.
            buf.rad.push((buf.bound[k] + 1e-300) / buf.norm * (1.0 + 1e-6) + rule);
        }
        Ok(true)
    }

    /// The scores of `signal` (scored into `buf`) a policy reads, refining through this model.
    pub(crate) fn scores<'a, T: CountValue>(&'a self, buf: &'a mut ScoreBuf, signal: Signal<'a, T>) -> Scores<'a> {
        let counts = match signal {
            Signal::Counts { data, .. } if !buf.x_ready => Some(data),
            _ => None,
        };
        let fill: Fill<'a> = match counts {
            Some(data) => Box::new(move |x: &mut Vec<f64>| self.signature_of(data, x)),
            None => Box::new(|_: &mut Vec<f64>| {}),
        };
        let ScoreBuf { x, x_ready, norm, est, rad, .. } = buf;
        let source = Source { x, ready: *x_ready, fill, norm: *norm, centroids: &self.centroids };
        Scores { est, rad, source: Some(source), refined: 0 }
    }
}

/// One pass over a layer's non-negative counts: adds (c · idf)² to the rule's lanes, the first
/// element at lane `offset` (the same operations in the same order as `exact::sum_squares` over
/// the signature), and writes min(c, i16::MAX) (−1 for a negative c) to `c16`. Returns (Σ c16,
/// min c16, max c16): Σ c and max c themselves whenever 0 ≤ min c16 and max c16 < i16::MAX.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn prepare_layer<T: CountValue>(c: &[T], idf: &[f64], offset: usize, squares: &mut [f64; exact::LANES], c16: &mut [i16]) -> (i64, i16, i16) {
    const N: usize = exact::LANES;
    let head = ((N - offset) % N).min(c.len());
    for j in 0..head {
        let x = c[j].as_f64() * idf[j];
        squares[offset + j] += x * x;
    }
    let mut cs = c[head..].chunks_exact(N);
    let mut ws = idf[head..].chunks_exact(N);
    for (cc, ww) in (&mut cs).zip(&mut ws) {
        for j in 0..N {
            let x = cc[j].as_f64() * ww[j];
            squares[j] += x * x;
        }
    }
    for (j, (v, &w)) in cs.remainder().iter().zip(ws.remainder()).enumerate() {
        let x = v.as_f64() * w;
        squares[j] += x * x;
    }
    for (o, v) in c16.iter_mut().zip(c) {
        *o = v.clamp_i16();
    }
    let min = c16.iter().fold(0i16, |m, &v| m.min(v));
    let max = c16.iter().fold(0i16, |m, &v| m.max(v));
    // i32 holds 65 536 values of at most i16::MAX.
    let sum = if c16.len() <= 1 << 16 {
        c16.iter().fold(0i32, |s, &v| s + v as i32) as i64
    } else {
        c16.iter().map(|&v| v as i64).sum()
    };
    (sum, min, max)
}

/// x = c · idf, elementwise in f64.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn weigh<T: CountValue>(c: &[T], idf: &[f32], x: &mut [f64]) {
    for ((o, v), &w) in x.iter_mut().zip(c).zip(idf) {
        *o = v.as_f64() * w as f64;
    }
}

/// round(c / 2^m) as int16 (the caller chose m so every value fits); returns Σ of the result.
fn narrow<T: CountValue>(c: &[T], m: u32, out: &mut [i16]) -> f64 {
    let half = (1u128 << m) >> 1;
    let mut total = 0.0;
    for (o, v) in out.iter_mut().zip(c) {
        *o = ((v.as_u64() as u128 + half) >> m) as i16;
        total += *o as f64;
    }
    total
}

/// Per-thread working memory of one scoring.
#[derive(Default)]
pub(crate) struct ScoreBuf {
    x: Vec<f64>,
    /// Whether `x` holds this request's signature (the certified path builds it on demand).
    x_ready: bool,
    norm: f64,
    c16: Vec<i16>,
    /// (experts, padded experts, layers) `c16` was laid out for.
    c16_shape: (usize, usize, usize),
    tmul: Vec<f32>,
    h: Vec<f64>,
    g: Vec<f64>,
    r: Vec<f64>,
    est32: Vec<f32>,
    bound: Vec<f64>,
    est: Vec<f64>,
    rad: Vec<f64>,
}

impl ScoreBuf {
    /// Sets the norm of `x`; false for the zero vector.
    fn set_norm(&mut self) -> bool {
        self.x_ready = true;
        self.norm = exact::sum_squares(&self.x).sqrt();
        self.norm > 0.0
    }
}

/// Each decoder's score as an interval `[est − rad, est + rad]` holding the exact score
/// (`rad = 0` once exact); [`exact`](Self::exact) computes and keeps the exact value.
pub struct Scores<'a> {
    est: &'a mut [f64],
    rad: &'a mut [f64],
    /// What refining needs (None: every score is exact).
    source: Option<Source<'a>>,
    refined: usize,
}

/// Writes the request's signature into the buffer given.
type Fill<'a> = Box<dyn Fn(&mut Vec<f64>) + 'a>;

/// The signature (built by `fill` on first use), its norm and the centroids.
struct Source<'a> {
    x: &'a mut Vec<f64>,
    ready: bool,
    fill: Fill<'a>,
    norm: f64,
    centroids: &'a Centroids,
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
            let src = self.source.as_mut().expect("scores with an error bound have a source");
            if !src.ready {
                (src.fill)(src.x);
                src.ready = true;
            }
            self.est[k] = exact::dot(src.x, src.centroids.row(k)) / src.norm;
            self.rad[k] = 0.0;
            self.refined += 1;
        }
        self.est[k]
    }
    /// Every score as known now (exact where computed, else the estimate) and the largest
    /// distance of any from its exact value.
    pub fn known(&self) -> (Vec<f64>, f64) {
        (self.est.to_vec(), self.rad.iter().copied().fold(0.0, f64::max))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Isa;

    /// The explicit-SIMD counts pass gives the generic loop's bits: the rule's norm lanes, the
    /// int16 copy and the folds (tails, clamped and negative counts included).
    #[test]
    fn simd_counts_pass_matches_the_generic_loop() {
        let mut rng = fastrand::Rng::with_seed(7);
        let isas = [Isa::detect(), Isa::Avx2].into_iter().filter(|&isa| isa != Isa::Avx2 || is_avx2());
        for isa in isas {
            for case in 0..400 {
                let n = [1, 31, 32, 33, 64, 127, 128, 200, 256][case % 9];
                let c: Vec<i32> = (0..n)
                    .map(|_| match rng.u8(..20) {
                        0 => -rng.i32(1..1000),
                        1 => rng.i32(i16::MAX as i32 - 2..i32::MAX),
                        _ => rng.i32(0..50),
                    })
                    .collect();
                let idf: Vec<f64> = (0..n).map(|_| rng.f64() * 3.0).collect();
                let start: [f64; exact::LANES] = std::array::from_fn(|_| rng.f64());
                let (mut sq_fast, mut sq_ref) = (start, start);
                let (mut c16_fast, mut c16_ref) = (vec![0i16; n], vec![0i16; n]);
                let c32 = <i32 as CountValue>::as_i32s(&c).expect("i32 counts take the SIMD pass");
                let Some(fast) = kernel::prepare_i32(isa, c32, &idf, 0, &mut sq_fast, &mut c16_fast) else {
                    assert_eq!(isa, Isa::Portable);
                    continue;
                };
                let reference = prepare_layer(&c, &idf, 0, &mut sq_ref, &mut c16_ref);
                assert_eq!(fast, reference, "{isa:?} n={n}");
                assert_eq!(c16_fast, c16_ref, "{isa:?} n={n}");
                assert_eq!(sq_fast.map(f64::to_bits), sq_ref.map(f64::to_bits), "{isa:?} n={n}");
            }
        }
    }

    fn is_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}
