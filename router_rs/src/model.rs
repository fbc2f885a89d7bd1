//! The locality model (signature geometry, unit centroids, their fixed-point copy) and the
//! scores it gives a request: certified estimates that a policy refines to exact values only
//! where a decision depends on them.
use crate::centroids::Centroids;
use crate::error::{Result, RouterError};
use crate::kernel::{self, exact};
use crate::kernel::quant::{lines, FineCounts, FirstCounts, LineBuf, Lines, Precision, Quantized, Terms};
use crate::kernel::{Extremes, Folds};
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
    /// The kept layers' IDF as f64 and as f32, `[kept][experts]`.
    idf64: Vec<f64>,
    idf32: Lines<f32>,
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
        let idf32 = lines(spec.kept().iter().flat_map(|&l| spec.idf_row(l).iter().copied()));
        let idf64 = idf32.iter().map(|&v| v as f64).collect();
        Ok(Self { spec, centroids, precision, quant, idf64, idf32 })
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
        let u8_first = q.first_counts_u8();
        if buf.c16_shape != (e, epad, kept.len()) {
            buf.c16.clear();
            buf.c16.resize(kept.len() * epad, 0);
            buf.c8.clear();
            buf.c8.resize(kept.len() * epad, 0);
            buf.c16_shape = (e, epad, kept.len());
        }
        buf.t16.clear();
        buf.t8.clear();
        buf.h.clear();
        buf.mu.clear();
        // One pass per layer gives the norm (x itself is built only if a score is refined), the
        // int16 counts, Σ c, Σ c² and max c. The SIMD pass estimates the norm within
        // `kernel::norm_rho` (the scores' intervals cover it; the rule's own norm is computed
        // with the first exact score); the generic loop adds the rule's f64 squares.
        let mut squares = [0.0f64; exact::LANES];
        let mut sq_fast = [0.0f64; 16];
        let limit = q.count_limit();
        let fast = T::as_i32s(counts).and_then(|c32| {
            let c8 = u8_first.then_some(&mut buf.c8[..]);
            kernel::prepare_i32(q.isa(), c32, kept, (e, epad), &self.idf32, &mut sq_fast, &mut buf.c16, c8, &mut buf.folds)
        });
        let fast_any = fast.is_some();
        let extremes = fast.unwrap_or_else(|| {
            buf.folds.clear();
            let mut x = Extremes::default();
            for (i, &l) in kept.iter().enumerate() {
                let c16 = &mut buf.c16[i * epad..][..e];
                let (f, fx) = prepare_layer(&counts[l * e..(l + 1) * e], &self.idf64[i * e..][..e], i * e % exact::LANES, &mut squares, c16);
                buf.folds.push(f);
                x = x.merge(fx);
            }
            x
        });
        let negative = extremes.negative || self.spec.dropped_negative(counts);
        self.spec.check_sign(counts, negative)?;
        let max16 = extremes.max as u64;
        let rho = q.rounding();
        // Every prompt but a huge one: no count above the kernel's limit (nor, with u8 counts,
        // above 255) and no i32 fold that may have wrapped, so every t_i is 1 and the int16
        // sums are the counts' own; the terms then come from the folds alone, layer-parallel.
        let u8_limit = if u8_first { u8::MAX as u64 } else { u64::MAX };
        let plain = max16 <= limit.min(u8_limit) && extremes.max < i16::MAX && e as u64 * max16 * max16 <= i32::MAX as u64;
        let mut d2 = 0.0f64;
        if plain {
            let ef = e as f64;
            if e.is_power_of_two() {
                // The same values as dividing (1/E exact), without a division per layer.
                let inv = 1.0 / ef;
                buf.mu.extend(buf.folds.iter().map(|f| f.sum as f64 * inv));
            } else {
                buf.mu.extend(buf.folds.iter().map(|f| f.sum as f64 / ef));
            }
            buf.h.extend(buf.folds.iter().map(|f| f.sum as f64 / 2.0 * (1.0 + 1e-12)));
            // Four chains (one was latency-bound); the order moves the sum by far less than the
            // 1e-12 `dnorm` adds.
            let mut part = [0.0f64; 4];
            for (j, (f, &mu)) in buf.folds.iter().zip(&buf.mu).enumerate() {
                part[j % 4] += centred_square(f.sum as f64, f.sumsq as f64, mu, e);
            }
            d2 = part.iter().sum();
            buf.t16.extend_unit(&buf.folds, rho);
            if u8_first {
                buf.t8.extend_unit(&buf.folds, rho);
            }
        } else {
            for (i, (&l, f)) in kept.iter().zip(&buf.folds).enumerate() {
                let c = &counts[l * e..(l + 1) * e];
                let max16 = buf.c16[i * epad..][..e].iter().fold(0i16, |m, &v| m.max(v));
                // t = 2^m, the smallest with round(max / t) ≤ limit: m = 0 but for huge prompts,
                // and then nothing was clamped and the int16 sums are the counts' own.
                let mut m = 0u32;
                let (mut sum, mut sumsq, mut max) = (f.sum as f64, f.sumsq as f64, max16 as u64);
                if max16 as u64 > limit || max16 == i16::MAX {
                    max = c.iter().fold(0u64, |a, v| a.max(v.as_u64()));
                    m = shift_for(max, limit);
                    sum = c.iter().map(|v| v.as_f64()).sum();
                    sumsq = c.iter().map(|v| v.as_f64() * v.as_f64()).sum();
                } else if e as u64 * max * max > i32::MAX as u64 {
                    sumsq = c.iter().map(|v| v.as_f64() * v.as_f64()).sum(); // the i32 fold may have wrapped
                }
                let mu = sum / e as f64;
                d2 += centred_square(sum, sumsq, mu, e);
                buf.mu.push(mu);
                let narrowed = if m == 0 { sum } else { narrow(c, m, &mut buf.c16[i * epad..][..e]) };
                // The 1e-12 covers the rounding of the f64 sums (an upper bound is all the bound needs).
                buf.h.push(sum / 2.0 * (1.0 + 1e-12));
                buf.t16.push(m, narrowed, rho);
                if u8_first {
                    // The same for the int8 table's u8 counts: t8 = 2^m8 with round(max / t8) ≤ 255
                    // (m8 = 0 for prompts of up to a few thousand tokens, and then c8 = c16 = c).
                    let m8 = shift_for(max, u8::MAX as u64);
                    let c8 = &mut buf.c8[i * epad..][..e];
                    let narrowed8 = if m8 == 0 && m == 0 {
                        if !fast_any {
                            for (o, &v) in c8.iter_mut().zip(&buf.c16[i * epad..][..e]) {
                                *o = v as u8;
                            }
                        } // else the SIMD pass wrote them (max ≤ 255: none clamped)
                        sum
                    } else {
                        narrow(c, m8, c8)
                    };
                    buf.t8.push(m8, narrowed8, rho);
                }
            }
        }
        if plain && u8_first && !fast_any {
            for (o, &v) in buf.c8.iter_mut().zip(buf.c16.iter()) {
                *o = v as u8;
            }
        }
        buf.x_ready = false;
        let n2 = exact::reduce(squares);
        if !fast_any {
            buf.norm = n2.sqrt();
            buf.norm_range = (buf.norm, buf.norm);
        } else {
            let n2 = n2 + sq_fast.iter().sum::<f64>();
            let rho = kernel::norm_rho(e);
            if n2.is_finite() && n2 > 1e-30 && rho < 1e-3 {
                buf.norm = f64::NAN; // the rule's own norm: computed with the first exact score
                buf.norm_range = ((n2 * (1.0 - rho)).sqrt() * (1.0 - 1e-15), (n2 * (1.0 + rho)).sqrt() * (1.0 + 1e-15));
            } else {
                // f32 overflow or underflow (extreme IDF): the rule's norm at once.
                self.signature_of(counts, &mut buf.x);
                buf.set_norm();
                buf.norm_range = (buf.norm, buf.norm);
            }
        }
        if buf.norm_range.1 == 0.0 {
            return Ok(false);
        }
        q.estimate(&buf.c16, &buf.t16.tmul, &buf.c8, &buf.t8.tmul, &mut buf.est32);
        if !buf.est32.iter().fold(true, |all, v| all & v.is_finite()) {
            return self.exact_counts(counts, buf); // weights so large the f32 estimate overflowed
        }
        let rule = exact::rule_error(dim);
        buf.est.clear();
        buf.rad.clear();
        buf.dnorm = d2.sqrt() * (1.0 + 1e-12);
        let first = if u8_first { &buf.t8 } else { &buf.t16 };
        let terms = Terms { h: &buf.h, g: &first.g, r: &first.r, mu: &buf.mu, dnorm: buf.dnorm, divided: first.divided };
        q.error_bounds(&terms, &mut buf.lanes32, &mut buf.corr, &mut buf.bound);
        // Written in place rather than pushed, so the divisions vectorise.
        let w = self.centroids.workers();
        buf.est.resize(w, 0.0);
        buf.rad.resize(w, 0.0);
        let found = buf.est32.iter().zip(&buf.corr).zip(&buf.bound);
        for ((e, r), ((&est, &corr), &bound)) in buf.est.iter_mut().zip(buf.rad.iter_mut()).zip(found) {
            (*e, *r) = interval(est as f64 + corr, bound, buf.norm_range, rule);
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
        let ScoreBuf { x, x_ready, norm, norm_range, est, rad, c16, t16, c8, t8, est32, h, mu, dnorm, fine_done, fine_rows, fine_scratch, fine_est, .. } = buf;
        let fine = match (&self.quant, counts) {
            (Some(q), Some(_)) if q.has_fine() => {
                fine_done.clear();
                fine_done.resize(self.centroids.workers(), false);
                let u8_first = q.first_counts_u8();
                // Where the first pass's u8 counts were divided, the residual would sit on
                // coarser counts than the int16 ones: the whole residual level from those.
                let (input, terms) = if u8_first && t8.divided {
                    (FineCounts::Whole { c16, tmul: &t16.tmul }, &*t16)
                } else {
                    let counts = FirstCounts { c16, tmul: &t16.tmul, c8, tmul8: &t8.tmul };
                    (FineCounts::Residual { counts, first: est32 }, if u8_first { &*t8 } else { &*t16 })
                };
                Some(Fine {
                    q,
                    input,
                    terms: Terms { h, g: &terms.g, r: &terms.r, mu, dnorm: *dnorm, divided: terms.divided },
                    range: *norm_range,
                    rule: exact::rule_error(self.spec.dim()),
                    done: fine_done,
                    rows: fine_rows,
                    scratch: fine_scratch,
                    est: fine_est,
                })
            }
            _ => None,
        };
        let norm = (!norm.is_nan()).then_some(*norm);
        let source = Source { x, ready: *x_ready, fill, norm, centroids: &self.centroids, fine };
        Scores { est, rad, source: Some(source), refined: 0 }
    }
}

/// One pass over a layer's non-negative counts: adds (c · idf)² to the rule's lanes, the first
/// element at lane `offset` (the same operations in the same order as `exact::sum_squares` over
/// the signature), and writes min(c, i16::MAX) (−1 for a negative c) to `c16`. Returns Σ c16,
/// Σ c16², max c16 and whether a count was negative: Σ c, Σ c² and max c themselves whenever
/// none was and max c16 < i16::MAX.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn prepare_layer<T: CountValue>(c: &[T], idf: &[f64], offset: usize, squares: &mut [f64; exact::LANES], c16: &mut [i16]) -> (Folds, Extremes) {
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
    let negative = c16.iter().any(|&v| v < 0);
    let max = c16.iter().fold(0i16, |m, &v| m.max(v));
    // i32 holds 65 536 values of at most i16::MAX.
    let sum = if c16.len() <= 1 << 16 {
        c16.iter().fold(0i32, |s, &v| s + v as i32) as i64
    } else {
        c16.iter().map(|&v| v as i64).sum()
    };
    let sumsq = c16.iter().fold(0i32, |a, &v| a.wrapping_add(v as i32 * v as i32));
    (Folds { sum, sumsq }, Extremes { max, negative })
}

/// ‖c − μ‖² of one layer from Σc, Σc² and μ = Σc / E: Σc² − μ·Σc, plus a margin for its f64
/// rounding (and for Σc, Σc² summed in f64): (E + 4)·ε_f64·Σc² bounds both.
#[inline]
fn centred_square(sum: f64, sumsq: f64, mu: f64, e: usize) -> f64 {
    (sumsq - mu * sum).max(0.0) + (e as f64 + 4.0) * f64::EPSILON * sumsq
}

/// A score's interval (centre, radius) from the estimate of Σ c·w, its bound, the range the norm
/// lies in and the rule's own rounding (`rule`). 1e-300: the estimate's f32 terms may underflow
/// by up to one subnormal step each; 1e-6 covers this arithmetic's rounding.
#[inline]
fn interval(est: f64, bound: f64, (n_lo, n_hi): (f64, f64), rule: f64) -> (f64, f64) {
    let (d_lo, d_hi) = (est - bound - 1e-300, est + bound + 1e-300);
    let lo = d_lo / if d_lo >= 0.0 { n_hi } else { n_lo };
    let hi = d_hi / if d_hi >= 0.0 { n_lo } else { n_hi };
    ((lo + hi) / 2.0, (hi - lo) / 2.0 * (1.0 + 1e-6) + rule)
}

/// x = c · idf, elementwise in f64.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn weigh<T: CountValue>(c: &[T], idf: &[f32], x: &mut [f64]) {
    for ((o, v), &w) in x.iter_mut().zip(c).zip(idf) {
        *o = v.as_f64() * w as f64;
    }
}

/// 2^m as f64 (exact).
fn pow2(m: u32) -> f64 {
    f64::from_bits((1023 + m as u64) << 52)
}

/// The smallest m with round(max / 2^m) ≤ limit.
fn shift_for(max: u64, limit: u64) -> u32 {
    let mut m = 0u32;
    while ((max as u128 + ((1u128 << m) >> 1)) >> m) > limit as u128 {
        m += 1;
    }
    m
}

/// round(c / 2^m) into `out` (the caller chose m so every value fits); returns Σ of the result.
fn narrow<T: CountValue, O: TryFrom<u128> + Into<f64> + Copy>(c: &[T], m: u32, out: &mut [O]) -> f64 {
    let half = (1u128 << m) >> 1;
    let mut total = 0.0;
    for (o, v) in out.iter_mut().zip(c) {
        *o = O::try_from((v.as_u64() as u128 + half) >> m).ok().expect("m was chosen so the value fits");
        total += (*o).into();
    }
    total
}

/// Per-thread working memory of one scoring.
#[derive(Default)]
pub(crate) struct ScoreBuf {
    x: Vec<f64>,
    /// Whether `x` holds this request's signature (the certified path builds it on demand).
    x_ready: bool,
    /// The rule's norm of the signature, NaN until computed (certified path).
    norm: f64,
    /// An interval holding it.
    norm_range: (f64, f64),
    /// Per kept layer, `epad` apart (each layer starts a cache line): the int16 counts.
    c16: LineBuf<i16>,
    /// Per kept layer: what the counts pass folded out of its int16 counts.
    folds: Vec<Folds>,
    /// (experts, padded experts, layers) `c16` was laid out for.
    c16_shape: (usize, usize, usize),
    /// Per kept layer: the int16 counts' scaling terms, and Σ_e c / 2 (the bounds' `Terms::h`).
    t16: CountTerms,
    h: Vec<f64>,
    /// The int8 table's u8 counts and their scaling terms, where it takes them.
    c8: LineBuf<u8>,
    t8: CountTerms,
    /// Per kept layer: the mean count; and ‖c − μ‖₂ over all of them (the bounds' `Terms`).
    mu: Vec<f64>,
    dnorm: f64,
    /// The estimates' corrections Σ_i μ_i·Σ_e ε (0 where the worst-case bound is used).
    corr: Vec<f64>,
    /// The bound terms in f32 (scratch of `Quantized::error_bounds`).
    lanes32: Vec<f32>,
    est32: Vec<f32>,
    bound: Vec<f64>,
    /// Two-level tables: which decoders' intervals the residual level has narrowed already, and
    /// the rows and estimates of one narrowing (kept so the request path does not allocate).
    fine_done: Vec<bool>,
    fine_rows: Vec<usize>,
    fine_scratch: Vec<f32>,
    fine_est: Vec<f64>,
    est: Vec<f64>,
    rad: Vec<f64>,
}

/// One count table's scaling terms per kept layer, for the kernel and the bounds' `Terms`: t_i
/// (the counts were divided by t_i = 2^m), g_i = t_i / 2 where m > 0 (else 0) and
/// r_i = ρ·t_i·Σ_e c' (ρ the kernel's rounding, c' the scaled counts).
#[derive(Default)]
struct CountTerms {
    tmul: Vec<f32>,
    g: Vec<f64>,
    r: Vec<f64>,
    /// Whether any layer's counts were divided (some g_i ≠ 0), kept as the terms are built.
    divided: bool,
}

impl CountTerms {
    fn clear(&mut self) {
        self.tmul.clear();
        self.g.clear();
        self.r.clear();
        self.divided = false;
    }
    /// [`push`](Self::push) with m = 0 for every layer, from the folds' sums.
    fn extend_unit(&mut self, folds: &[Folds], rho: f64) {
        self.tmul.resize(folds.len(), 1.0);
        self.g.resize(folds.len(), 0.0);
        self.r.extend(folds.iter().map(|f| rho * 1.0 * f.sum as f64 * (1.0 + 1e-12)));
    }
    fn push(&mut self, m: u32, scaled_sum: f64, rho: f64) {
        let t = pow2(m);
        self.tmul.push(t as f32);
        self.g.push(if m == 0 { 0.0 } else { t / 2.0 });
        self.divided |= m > 0;
        // The 1e-12 covers the rounding of the f64 sum.
        self.r.push(rho * t * scaled_sum * (1.0 + 1e-12));
    }
}

impl ScoreBuf {
    /// Sets the norm of `x`; false for the zero vector.
    fn set_norm(&mut self) -> bool {
        self.x_ready = true;
        self.norm = exact::sum_squares(&self.x).sqrt();
        self.norm_range = (self.norm, self.norm);
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
/// What narrowing with the residual level needs: the tables, the request's counts (and first
/// estimates) and bound terms, the norm range, which decoders have been narrowed, and scratch
/// for one call.
struct Fine<'a> {
    q: &'a Quantized,
    input: FineCounts<'a>,
    terms: Terms<'a>,
    range: (f64, f64),
    rule: f64,
    done: &'a mut Vec<bool>,
    rows: &'a mut Vec<usize>,
    scratch: &'a mut Vec<f32>,
    est: &'a mut Vec<f64>,
}

/// The signature (built by `fill` on first use), its norm (computed with it where the scores
/// were estimated with a norm range) and the centroids.
struct Source<'a> {
    x: &'a mut Vec<f64>,
    ready: bool,
    fill: Fill<'a>,
    norm: Option<f64>,
    centroids: &'a Centroids,
    fine: Option<Fine<'a>>,
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
            let norm = *src.norm.get_or_insert_with(|| exact::sum_squares(src.x).sqrt());
            self.est[k] = exact::dot(src.x, src.centroids.row(k)) / norm;
            self.rad[k] = 0.0;
            self.refined += 1;
        }
        self.est[k]
    }
    /// Whether [`narrow`](Self::narrow) can tighten anything (an int8 first table).
    pub fn can_narrow(&self) -> bool {
        self.source.as_ref().is_some_and(|s| s.fine.is_some())
    }
    /// Narrows the intervals of decoders `ks` with their int16 estimates where the first estimate
    /// came from an int8 table (once per decoder; a no-op otherwise). Cheap next to
    /// [`exact`](Self::exact): one int8 residual row per decoder, no signature; the rows of one call are
    /// read together.
    pub fn narrow(&mut self, ks: impl IntoIterator<Item = usize>) {
        self.narrow_reaching(ks, f64::NEG_INFINITY);
    }
    /// [`narrow`](Self::narrow) for those of `ks` whose interval reaches `floor`.
    pub fn narrow_reaching(&mut self, ks: impl IntoIterator<Item = usize>, floor: f64) {
        let Some(f) = self.source.as_mut().and_then(|s| s.fine.as_mut()) else { return };
        f.rows.clear();
        for k in ks {
            if self.rad[k] != 0.0 && !f.done[k] && self.est[k] + self.rad[k] >= floor {
                f.done[k] = true;
                f.rows.push(k);
            }
        }
        if f.rows.is_empty() {
            return;
        }
        f.q.estimate_fine(f.rows, f.input, f.scratch, f.est).expect("a residual level");
        for (i, &k) in f.rows.iter().enumerate() {
            let (e, r) = f.q.bound_fine(k, f.est[i], &f.terms);
            let (e, r) = interval(e, r, f.range, f.rule);
            if r < self.rad[k] {
                (self.est[k], self.rad[k]) = (e, r);
            }
        }
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

    /// The explicit-SIMD counts pass gives the generic loop's int16 counts and folds (tails,
    /// clamped and negative counts included), and its Σ (c·idf)² lies within `norm_rho` of the
    /// rule's f64 sum.
    #[test]
    fn simd_counts_pass_matches_the_generic_loop() {
        let mut rng = fastrand::Rng::with_seed(7);
        let isas = [Isa::detect(), Isa::Avx2].into_iter().filter(|&isa| isa != Isa::Avx2 || is_avx2());
        for isa in isas {
            for case in 0..400 {
                let n = [1, 31, 32, 33, 64, 127, 128, 200, 256][case % 9];
                let c: Vec<i32> = (0..n)
                    .map(|_| match rng.u8(..20) {
                        0 if case % 2 == 0 => -rng.i32(1..1000),
                        1 => rng.i32(i16::MAX as i32 - 2..i32::MAX),
                        _ => rng.i32(0..50),
                    })
                    .collect();
                let idf: Vec<f32> = (0..n).map(|_| rng.f32() * 3.0).collect();
                let idf64: Vec<f64> = idf.iter().map(|&v| v as f64).collect();
                let start: [f64; 16] = std::array::from_fn(|_| rng.f64());
                let mut sq_fast = start;
                let mut sq_ref = [0.0f64; exact::LANES];
                let (mut c16_fast, mut c16_ref) = (vec![0i16; n], vec![0i16; n]);
                let c32 = <i32 as CountValue>::as_i32s(&c).expect("i32 counts take the SIMD pass");
                let mut c8 = vec![0u8; n];
                let want8 = isa == Isa::Avx512Vnni;
                let mut folds = Vec::new();
                let Some(extremes) = kernel::prepare_i32(isa, c32, &[0], (n, n), &idf, &mut sq_fast, &mut c16_fast, want8.then_some(&mut c8[..]), &mut folds) else {
                    assert_eq!(isa, Isa::Portable);
                    continue;
                };
                let reference = prepare_layer(&c, &idf64, 0, &mut sq_ref, &mut c16_ref);
                assert_eq!(extremes, reference.1, "{isa:?} n={n}");
                // Negative counts (refused by the caller) leave their int16 and u8, and the
                // layer's sums, unspecified.
                if !extremes.negative {
                    assert_eq!(folds[0], reference.0, "{isa:?} n={n}");
                }
                let keep = |v: &[i16]| v.iter().zip(&c).filter(|(_, &x)| x >= 0).map(|(&u, _)| u).collect::<Vec<i16>>();
                assert_eq!(keep(&c16_fast), keep(&c16_ref), "{isa:?} n={n}");
                if want8 {
                    let keep = |v: &Vec<u8>| v.iter().zip(&c).filter(|(_, &x)| x >= 0).map(|(&u, _)| u).collect::<Vec<u8>>();
                    let c8_ref: Vec<u8> = c.iter().map(|&v| v.clamp(0, 255) as u8).collect();
                    assert_eq!(keep(&c8), keep(&c8_ref), "{isa:?} n={n}");
                }
                let got: f64 = sq_fast.iter().zip(&start).map(|(a, b)| a - b).sum();
                let want = exact::reduce(sq_ref);
                // The start values' own rounding in `got` is at most 16 f64 steps of ~1.
                assert!((got - want).abs() <= kernel::norm_rho(n) * want + 1e-12, "{isa:?} n={n}: {got} vs {want}");
            }
        }
    }

    /// Every interval holds the exact score: the first estimate's (int16, or int8 with u8 or int16
    /// counts), and the residual level's an int8 interval is narrowed to (first estimate plus
    /// residual, or whole from int16 counts above the u8 limit), which narrows it. Counts spread over the experts
    /// (the Cauchy–Schwarz bound wins), piled on one expert (the worst case wins), above the u8
    /// and int16 limits, and with empty layers.
    #[test]
    fn intervals_hold_the_exact_scores() {
        let mut rng = fastrand::Rng::with_seed(11);
        for case in 0..600 {
            let (layers, experts) = ([1, 3, 6][case % 3], [64, 100, 128, 256][rng.usize(..4)]);
            let workers = rng.usize(1..24);
            let idf: Vec<f32> = (0..layers * experts).map(|_| if rng.u8(..10) == 0 { 0.0 } else { 0.05 + rng.f32() * 3.0 }).collect();
            // Every fifth case drops layer 1, so kept layer i reads counts of layer i + 1 past it.
            let mask: Vec<bool> = (0..layers).map(|l| case % 5 != 0 || l != 1 || layers == 1).collect();
            let spec = SignatureSpec::new(layers, experts, Some(&idf), Some(&mask)).unwrap();
            let dim = spec.dim();
            let base: Vec<f32> = (0..dim).map(|_| rng.f32()).collect();
            let spread = [1e-4f32, 0.05, 1.0][rng.usize(..3)];
            let rows: Vec<f32> = (0..workers * dim).map(|i| base[i % dim] + spread * rng.f32()).collect();
            let top = [3i32, 300, 40_000, 3_000_000][rng.usize(..4)];
            let counts: Vec<i32> = (0..layers * experts)
                .map(|j| match case % 4 {
                    0 => rng.i32(0..top),                                         // spread
                    1 => if j % experts == 7 { top } else { rng.i32(0..2) },     // piled on one expert
                    2 => if j / experts == 1 { 0 } else { rng.i32(0..top) },     // an empty layer
                    _ => (rng.f32().powi(4) * top as f32) as i32,               // skewed
                })
                .collect();
            let signal = Signal::Counts { data: &counts, rows: layers, cols: experts };
            for precision in [Precision::Int16, Precision::Int8] {
                let model = LocalityModel::with_precision(spec.clone(), Centroids::new(&rows, workers, dim).unwrap(), precision).unwrap();
                let mut buf = ScoreBuf::default();
                if !model.score(signal, &mut buf).unwrap() {
                    continue;
                }
                let mut s = model.scores(&mut buf, signal);
                for k in 0..workers {
                    let (lo, hi) = (s.lo(k), s.hi(k));
                    s.narrow([k]);
                    let (nlo, nhi) = (s.lo(k), s.hi(k));
                    let exact = s.exact(k);
                    let what = format!("case {case} {precision:?} k={k} top={top}");
                    assert!(lo <= exact && exact <= hi, "{what}: {exact} outside [{lo}, {hi}]");
                    assert!(nlo <= exact && exact <= nhi, "{what}: {exact} outside narrowed [{nlo}, {nhi}]");
                    assert!(nhi - nlo <= hi - lo, "{what}: narrowing widened the interval");
                    // The residual level narrows (its error is the int8 level's / 128) wherever the
                    // counts need no division beyond the int16 ones' (those above the u8 limit
                    // are read whole, as int16).
                    if precision == Precision::Int8 && top <= 300 {
                        assert!(nhi - nlo < 0.1 * (hi - lo), "{what}: narrowed only to {} of {}", nhi - nlo, hi - lo);
                    }
                }
            }
        }
    }

    /// A score interval holds d / n for every d within the bound and n within the norm range.
    #[test]
    fn interval_covers_the_norm_range() {
        let mut rng = fastrand::Rng::with_seed(5);
        for _ in 0..10_000 {
            let (est, bound) = ((rng.f64() - 0.5) * 10.0, rng.f64() * [1e-9, 1e-3, 3.0][rng.usize(..3)]);
            let n = 0.1 + rng.f64() * 100.0;
            let range = (n * (1.0 - rng.f64() * 1e-4), n * (1.0 + rng.f64() * 1e-4));
            let (c, r) = interval(est, bound, range, 0.0);
            for d in [est - bound, est, est + bound] {
                for n in [range.0, range.1] {
                    assert!((d / n - c).abs() <= r, "{d}/{n} outside {c} ± {r}");
                }
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
