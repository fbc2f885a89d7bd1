//! Fixed-point centroids with the IDF folded in: for decoder k and kept layer i, the weights
//! w = idf · c_k are stored as integers Q times a power of two s_ki (int16; for large fleets int8,
//! with an int8 residual beside it, which with the int8 table stands for 15-bit weights, to narrow
//! the few intervals that matter), in tables aligned to cache lines, and a prompt's counts
//! as int16 (u8 for the int8 table on VNNI), divided by a power of two t_i in the rare layer whose
//! counts exceed the kernel's limit. The estimate Σ_i s_ki·t_i·Σ_e c'·Q comes with a bound that
//! holds for any input: the weights' rounding ε = w − s·Q contributes Σ c·ε, bounded either by the
//! worst case Σ_i s_ki·Σ_e c / 2 (|ε| ≤ s/2) or, with each layer's counts centred on their mean
//! μ_i, by the exact Σ_i μ_i·Σ_e ε (added to the estimate) plus ‖c − μ‖₂·‖ε_k‖₂ (Cauchy–Schwarz;
//! several times tighter for counts spread over many experts); the counts' rounding
//! (|c − t·c'| ≤ t/2) contributes Σ_i s_ki·t_i/2·Σ_e |Q|; the kernel's f32 rounding a term of its
//! own. Powers of two keep every scaling exact.
use super::Isa;
use aligned_vec::{AVec, ConstAlign};
use multiversion::multiversion;

/// A table aligned to a cache line, so every 64-byte weight load reads one line (a `Vec` from
/// the allocator sat 16 or 32 bytes off, and every load of the kernels then read two).
pub(crate) type Lines<T> = AVec<T, ConstAlign<64>>;

/// A growable buffer of [`Lines`] (the per-request counts the kernels read), empty by default.
pub(crate) struct LineBuf<T>(pub Lines<T>);

impl<T> Default for LineBuf<T> {
    fn default() -> Self {
        Self(Lines::new(64))
    }
}
impl<T> std::ops::Deref for LineBuf<T> {
    type Target = Lines<T>;
    fn deref(&self) -> &Lines<T> {
        &self.0
    }
}
impl<T> std::ops::DerefMut for LineBuf<T> {
    fn deref_mut(&mut self) -> &mut Lines<T> {
        &mut self.0
    }
}

/// `v` as a cache-line-aligned table.
pub(crate) fn lines<T: Copy>(v: impl IntoIterator<Item = T>) -> Lines<T> {
    Lines::from_iter(64, v)
}

/// Which integer width holds the centroids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Exact below 512 dimensions; else int16, or int8 + residual above a table size: 32 K
    /// weights on AVX-512 VNNI (where the int8 pass runs `vpdpbusd` on u8 counts and halves the
    /// bytes a decision reads: measured faster from 8 decoders of (48, 128) on — receipts
    /// unresolved at 8 — and slower at 4; `bench/router_ab.py --new-mode`), 32 M weights
    /// elsewhere (the AVX2 int8 kernel sign-extends each weight, which costs what the bytes save).
    Auto,
    Int16,
    /// An int8 first pass over every decoder, then the residual level for the decoders whose int8
    /// interval leaves a decision open (`Scores::narrow`), then exact scores.
    Int8,
    /// No fixed point: every score computed exactly (the reference the others must agree with).
    Exact,
}

/// The residual level's scale is the int8 level's divided by 2^this (|R| ≤ 2^(this − 1)).
const RESIDUAL_SHIFT: u32 = 7;
/// Decoders per step of [`bounds_all`] (one AVX-512 register of f32).
const BOUND_LANES: usize = 16;
/// Above this many weights (W × D) `Auto` stores int8 + residual on AVX-512 VNNI ...
pub const AUTO_INT8_ABOVE_VNNI: usize = 1 << 15;
/// ... and on other CPUs.
pub const AUTO_INT8_ABOVE: usize = 1 << 25;
/// Experts per layer are padded to this many int16 lanes (one AVX-512 register), or with an int8
/// table to 64 (one register of int8 weights and u8 counts).
const PAD: usize = 32;
const PAD8: usize = 64;

#[derive(Debug, Clone)]
enum Table {
    I16(Lines<i16>),
    I8(Lines<i8>),
}

/// One fixed-point copy of the weights: the integer table and its per-(decoder, layer) scales.
#[derive(Debug, Clone)]
struct Level {
    table: Table,
    /// s_ki, `[W][layers]`.
    scale: Vec<f32>,
    /// The bound terms per decoder and layer, `[W][layers]`: s_ki·Σ_e |Q_kie| (rounded up;
    /// exact while E·32767 < 2^24) and s_ki·m_ki, m = max_e |Q_kie| (for a residual level
    /// 128·max |Q8| + max |R|: its estimate adds two f32 sums; exact: s is a power of two). f32: at
    /// 1024 decoders they are read for every decoder per decision, and f64 doubled their bytes.
    abs_q: Vec<f32>,
    max_q: Vec<f32>,
    /// ‖ε_k‖₂ rounded up, `[W]`, and Σ_e ε_kie rounded to f32, `[W][layers]`, of the rounding
    /// errors ε = w − s·Q, for the Cauchy–Schwarz bound. |Σ_e ε| ≤ E·s/2, so the f32 rounding
    /// moves Σ_i μ_i·Σ_e ε by at most 2⁻²⁴ of the worst-case bound Σ_i s·Σ_e c/2 (underflow
    /// included, s ≥ 2⁻¹²⁰); the bounds' margin covers it.
    eps_norm: Vec<f64>,
    eps_sum: Vec<f32>,
    /// `scale`, `abs_q`, `max_q` and `eps_sum` in blocks of [`BOUND_LANES`] decoders,
    /// `[W/8][layers][8]` (zeros beyond W), so [`bounds_all`] reads each block's terms as one
    /// contiguous run with eight decoders per load; the row-major copies serve one decoder's
    /// bound.
    scale_blk: Vec<f32>,
    abs_q_blk: Vec<f32>,
    max_q_blk: Vec<f32>,
    eps_sum_blk: Vec<f32>,
}

/// What a request's error bounds need, per kept layer (see [`Quantized::error_bounds`]).
#[derive(Debug, Clone, Copy)]
pub struct Terms<'a> {
    /// Σ_e c / 2, rounded up.
    pub h: &'a [f64],
    /// t_i / 2 where the layer's counts were divided by t_i > 1, else 0.
    pub g: &'a [f64],
    /// ρ·t_i·Σ_e c'.
    pub r: &'a [f64],
    /// μ_i = Σ_e c / E, the layer's mean count.
    pub mu: &'a [f64],
    /// ‖c − μ‖₂ over every kept layer (each layer centred on its own mean), rounded up.
    pub dnorm: f64,
    /// Whether any g_i is non-zero (known as the terms are built, not searched for per use).
    pub divided: bool,
}

#[derive(Debug, Clone)]
pub struct Quantized {
    workers: usize,
    layers: usize,
    experts: usize,
    epad: usize,
    /// The table every decoder is estimated from first: int16, or int8 with `fine` beside it.
    first: Level,
    /// With an int8 first pass: its residual level, which a single decoder's interval is narrowed
    /// with before its exact score is needed ([`estimate_fine`](Quantized::estimate_fine)).
    fine: Option<Level>,
    count_limit: u64,
    isa: Isa,
    /// 0..W, the rows of a full pass.
    all: Vec<usize>,
}

fn pow2_f64(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}
fn pow2_f32(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// Smallest power-of-two exponent e with m / 2^e ≤ qmax, or None outside f32's normal range.
fn exponent(m: f64, qmax: f64) -> Option<i32> {
    if m == 0.0 {
        return Some(0);
    }
    let mut e = (m / qmax).log2().ceil() as i32;
    while m / pow2_f64(e) > qmax {
        e += 1;
    }
    while e > -126 && m / pow2_f64(e - 1) <= qmax {
        e -= 1;
    }
    (-120..=120).contains(&e).then_some(e)
}

impl Level {
    /// The weights idf · row quantised to at most `qmax` in magnitude, or None when one is out of
    /// the range a power-of-two scale covers (or a bound term out of f32's).
    fn new(rows: &[f32], idf: &[f32], workers: usize, layers: usize, experts: usize, epad: usize, int8: bool) -> Option<Self> {
        let qmax = if int8 { 127.0 } else { 32767.0 };
        Self::build(rows, idf, (workers, layers, experts, epad), int8, |_, w, table, q| {
            let ex = exponent(w.iter().fold(0.0f64, |a, v| a.max(v.abs())), qmax)?;
            let s = pow2_f64(ex);
            for ((t, q), wv) in table.iter_mut().zip(q.iter_mut()).zip(w) {
                *q = (wv / s).round() as i32;
                *t = *q;
            }
            Some((ex, q.iter().fold(0, |m, v| m.max(v.unsigned_abs()))))
        })
    }

    /// The residual of an int8 level: for each weight, R = round((w − s8·Q8) / s16) with
    /// s16 = s8 / 128, so |R| ≤ 64 fits int8, and the level stands for the weights
    /// s16·(128·Q8 + R) (|ε| ≤ s16/2, the int8 level's error / 128). A narrowing reads the int8
    /// estimate already made plus one int8 row of R (half the bytes of an int16 row). None where
    /// s16 would leave the range the bounds assume (s8 < 2⁻¹¹³).
    fn residual(rows: &[f32], idf: &[f32], first: &Level, (workers, layers, experts, epad): (usize, usize, usize, usize)) -> Option<Self> {
        let Table::I8(q8) = &first.table else { return None };
        Self::build(rows, idf, (workers, layers, experts, epad), true, |at, w, table, q| {
            let ex8 = ((first.scale[at].to_bits() >> 23) & 0xff) as i32 - 127;
            let ex = ex8 - RESIDUAL_SHIFT as i32;
            if ex < -120 {
                return None;
            }
            let (s8, s) = (pow2_f64(ex8), pow2_f64(ex));
            let row = &q8[at * epad..][..w.len()];
            let mut mq = (0u32, 0u32);
            for (((t, q), wv), &q8) in table.iter_mut().zip(q.iter_mut()).zip(w).zip(row) {
                let r = ((wv - s8 * q8 as f64) / s).round() as i32;
                debug_assert!(r.abs() <= 64);
                (*t, *q) = (r, ((q8 as i32) << RESIDUAL_SHIFT) + r);
                mq = (mq.0.max(q8.unsigned_abs() as u32), mq.1.max(r.unsigned_abs()));
            }
            // The f32 rounding of the int8 estimate (max |Q8| at s8) and of the residual's.
            Some((ex, (mq.0 << RESIDUAL_SHIFT) + mq.1))
        })
    }

    /// A level from `quant`, which, for decoder × layer `at` and its weights w, writes the table's
    /// entries and the integers Q the level stands for (weights s·Q), and returns the exponent of
    /// s and the integer m with s·m bounding the f32 rounding of the estimate per count (max |Q|
    /// for a one-table level).
    fn build(
        rows: &[f32],
        idf: &[f32],
        (workers, layers, experts, epad): (usize, usize, usize, usize),
        int8: bool,
        mut quant: impl FnMut(usize, &[f64], &mut [i32], &mut [i32]) -> Option<(i32, u32)>,
    ) -> Option<Self> {
        let dim = layers * experts;
        let mut table = vec![0i32; workers * layers * epad];
        let mut q = vec![0i32; experts];
        let mut scale = Vec::with_capacity(workers * layers);
        let mut abs_q = Vec::with_capacity(workers * layers);
        let mut max_q = Vec::with_capacity(workers * layers);
        let mut w = vec![0.0f64; experts];
        let mut eps_norm = Vec::with_capacity(workers);
        let mut eps_sum = Vec::with_capacity(workers * layers);
        for k in 0..workers {
            let mut sq = 0.0f64;
            for i in 0..layers {
                let row = &rows[k * dim + i * experts..][..experts];
                for (e, wv) in w.iter_mut().enumerate() {
                    // Exact: a product of two f32 fits in f64's mantissa.
                    *wv = idf[i * experts + e] as f64 * row[e] as f64;
                }
                let at = k * layers + i;
                let (ex, mq) = quant(at, &w, &mut table[at * epad..][..experts], &mut q)?;
                let s = pow2_f64(ex);
                let (mut a, mut es) = (0.0f64, 0.0f64);
                for (&qv, &wv) in q.iter().zip(&w) {
                    a += qv.unsigned_abs() as f64;
                    let eps = wv - s * qv as f64;
                    es += eps;
                    sq += eps * eps;
                }
                scale.push(pow2_f32(ex));
                abs_q.push(up_f32(a * s));
                max_q.push((mq as f64 * s) as f32);
                eps_sum.push(es as f32);
            }
            // Σ ε² in f64: relative rounding ≤ (D + 1)·ε_f64, far inside the margin (D < 2^20).
            eps_norm.push((sq * (1.0 + 1e-9)).sqrt() * (1.0 + 1e-15) + 1e-300);
        }
        let table = if int8 { Table::I8(lines(table.iter().map(|&v| v as i8))) } else { Table::I16(lines(table.iter().map(|&v| v as i16))) };
        // f32 terms past f32's range (weights near f32::MAX): every score is computed exactly.
        if abs_q.iter().chain(&max_q).chain(&eps_sum).any(|v| !v.is_finite()) {
            return None;
        }
        // Block b, layer i, lane l holds decoder k = b·8 + l.
        let blocks = workers.div_ceil(BOUND_LANES);
        let t = |v: &[f32]| -> Vec<f32> {
            let at = |j: usize| (j / (layers * BOUND_LANES) * BOUND_LANES + j % BOUND_LANES, j / BOUND_LANES % layers);
            (0..blocks * layers * BOUND_LANES).map(at).map(|(k, i)| if k < workers { v[k * layers + i] } else { 0.0 }).collect()
        };
        let (scale_blk, abs_q_blk, max_q_blk, eps_sum_blk) = (t(&scale), t(&abs_q), t(&max_q), t(&eps_sum));
        Some(Self { table, scale, abs_q, max_q, eps_norm, eps_sum, scale_blk, abs_q_blk, max_q_blk, eps_sum_blk })
    }

    /// Estimated Σ c·w of decoders `rows` into `est` (the same length).
    fn estimate(&self, isa: Isa, d: Dims, rows: &[usize], counts: &[i16], tmul: &[f32], est: &mut [f32]) {
        // Every row is a decoder of the table: `Quantized` passes 0..W or checked rows.
        assert_eq!(rows.len(), est.len());
        debug_assert!(rows.iter().all(|&k| k < d.workers));
        let scale = &self.scale;
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86;
            // SAFETY: the ISA was detected at run time, every slice holds what `d` says and every
            // row is a decoder of the table.
            unsafe {
                let unit = unit_t(tmul, d.layers);
                match (isa, &self.table) {
                    (Isa::Avx512Vnni, Table::I16(q)) => return by_unit!(unit, x86::vnni_i16(d, counts, q, scale, tmul, rows, est)),
                    (Isa::Avx512Vnni, Table::I8(_)) => unreachable!("an int8 table on VNNI takes u8 counts"),
                    (Isa::Avx2, Table::I16(q)) => return by_unit!(unit, x86::avx2_i16(d, counts, q, scale, tmul, rows, est)),
                    (Isa::Avx2, Table::I8(q)) => return by_unit!(unit, x86::avx2_i8(d, counts, q, scale, tmul, rows, est)),
                    (Isa::Portable, _) => {}
                }
            }
        }
        let _ = isa;
        match &self.table {
            Table::I16(q) => portable(d, counts, q, scale, tmul, rows, est),
            Table::I8(q) => portable(d, counts, q, scale, tmul, rows, est),
        }
    }

    /// Decoder k's (correction, bound) of [`Quantized::error_bounds`], alone (narrowing a few
    /// decoders; [`bounds_all`] gives every decoder's at once).
    fn bound(&self, k: usize, layers: usize, t: &Terms) -> (f64, f64) {
        let at = k * layers..(k + 1) * layers;
        let worst = dot32(&self.scale[at.clone()], t.h);
        let rest = dot32(&self.max_q[at.clone()], t.r) + if t.divided { dot32(&self.abs_q[at.clone()], t.g) } else { 0.0 };
        let cs = cs_bound(t.dnorm, self.eps_norm[k], worst);
        if cs < worst {
            (dot32(&self.eps_sum[at], t.mu), cs + rest)
        } else {
            (0.0, worst + rest)
        }
    }
}

/// Σ a·b in four chains (a bound needs no fixed order; one chain was latency-bound).
fn dot32(a: &[f32], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(&x, y)| x as f64 * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..4 {
            acc[l] += x[l] as f64 * y[l];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The Cauchy–Schwarz part of a decoder's bound: ‖c − μ‖₂·‖ε_k‖₂ plus a margin for the
/// correction's own rounding, ≤ 2⁻²⁴·worst from `eps_sum`'s f32 (see there) and ≤
/// (E + layers + 2)·ε_f64·worst from f64 (|ε| ≤ s/2 and μ_i·E = Σ_e c): 1e-7·worst covers both.
#[inline]
fn cs_bound(dnorm: f64, eps_norm: f64, worst: f64) -> f64 {
    dnorm * eps_norm + 1e-7 * worst
}

/// A float the bound terms are summed in: f32 (sixteen decoders per AVX-512 register, and the
/// request's terms rounded up) or f64 (where an f32 sum leaves f32's range).
trait BoundLane: Copy + Default + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + From<f32> + Into<f64> {
    /// Twice the unit roundoff.
    const EPS: f64;
    /// The smallest positive value: what a product that underflows may lose.
    const TINY: f64;
}
impl BoundLane for f32 {
    const EPS: f64 = f32::EPSILON as f64;
    const TINY: f64 = 1.401_298_464_324_817e-45;
}
impl BoundLane for f64 {
    const EPS: f64 = f64::EPSILON;
    const TINY: f64 = 5e-324;
}

/// A request's bound terms per kept layer in the lane type: h, μ, r and g of [`Terms`] (f32:
/// h, r, g rounded up, μ to nearest).
struct LayerTerms<'a, R> {
    h: &'a [R],
    mu: &'a [R],
    r: &'a [R],
    g: &'a [R],
}

/// Every decoder's (correction, bound) of [`Quantized::error_bounds`] into `corr` and `out`:
/// [`BOUND_LANES`] decoders at a time, their sums in registers, along the blocked terms (no
/// per-decoder horizontal sums). In lanes of R: each sum of `layers` products is within
/// (layers + 1)·R::EPS/2 of its value relative to Σ of their magnitudes, plus one R::TINY per
/// product that underflows; the bounds are widened by γ = (layers + 8)·R::EPS (and the
/// correction's error, at most γ·worst since |Σ_e ε|·μ ≤ s·h, is added to the Cauchy–Schwarz
/// bound). False where a sum left R's range (then no value is to be used).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn bounds_all<R: BoundLane>(level: &Level, t: &LayerTerms<R>, dnorm: f64, narrowed: bool, corr: &mut Vec<f64>, out: &mut Vec<f64>) -> bool {
    const N: usize = BOUND_LANES;
    let w = level.eps_norm.len();
    let layers = t.h.len();
    let gamma = (layers as f64 + 8.0) * R::EPS;
    let tiny = (3.0 * layers as f64 + 3.0) * R::TINY;
    corr.clear();
    out.clear();
    for k0 in (0..w).step_by(N) {
        let block = k0 * layers..(k0 + N) * layers;
        let (s, e, m) = (&level.scale_blk[block.clone()], &level.eps_sum_blk[block.clone()], &level.max_q_blk[block.clone()]);
        let (mut worst, mut cor, mut rest) = ([R::default(); N], [R::default(); N], [R::default(); N]);
        let terms = s.chunks_exact(N).zip(e.chunks_exact(N)).zip(m.chunks_exact(N));
        for (((s, e), m), ((&h, &mu), &r)) in terms.zip(t.h.iter().zip(t.mu).zip(t.r)) {
            for l in 0..N {
                worst[l] = worst[l] + R::from(s[l]) * h;
                cor[l] = cor[l] + R::from(e[l]) * mu;
                rest[l] = rest[l] + R::from(m[l]) * r;
            }
        }
        if narrowed {
            for (a, &g) in level.abs_q_blk[block].chunks_exact(N).zip(t.g) {
                for l in 0..N {
                    rest[l] = rest[l] + R::from(a[l]) * g;
                }
            }
        }
        for l in 0..N.min(w - k0) {
            let worst: f64 = worst[l].into() * (1.0 + gamma) + tiny;
            let cs = cs_bound(dnorm, level.eps_norm[k0 + l], worst) + gamma * worst + tiny;
            let (c, b) = if cs < worst { (cor[l].into(), cs) } else { (0.0, worst) };
            corr.push(c);
            out.push(b + rest[l].into() * (1.0 + gamma) + tiny);
        }
    }
    out.iter().chain(corr.iter()).fold(true, |all, v| all & v.is_finite())
}

/// Whether every count divisor t_i is 1 (every prompt but a huge one): the kernels then skip
/// the multiply by t_i.
fn unit_t(tmul: &[f32], layers: usize) -> bool {
    // A fold without an early exit: it vectorises (checked once per kernel call).
    tmul[..layers].iter().fold(true, |all, &t| all & (t == 1.0))
}

/// Calls a kernel with `UNIT_T` = the value given.
#[cfg(target_arch = "x86_64")]
macro_rules! by_unit {
    ($unit:expr, $($f:ident)::+($($arg:expr),*)) => {
        if $unit { $($f)::+::<true>($($arg),*) } else { $($f)::+::<false>($($arg),*) }
    };
}
#[cfg(target_arch = "x86_64")]
use by_unit;

/// The smallest f32 ≥ x (x ≥ 0; infinity above f32's range).
fn up_f32(x: f64) -> f32 {
    let f = x as f32;
    if (f as f64) < x {
        f.next_up()
    } else {
        f
    }
}

impl Quantized {
    /// `rows`: unit centroids `[W][layers·experts]`; `idf`: `[layers][experts]` of the kept layers.
    /// None when a weight is outside the range a power-of-two scale covers (then every score is
    /// computed exactly).
    pub fn new(rows: &[f32], idf: &[f32], workers: usize, layers: usize, experts: usize, precision: Precision) -> Option<Self> {
        let isa = Isa::detect();
        let int8 = match precision {
            Precision::Auto if isa == Isa::Avx512Vnni => workers * layers * experts > AUTO_INT8_ABOVE_VNNI,
            Precision::Auto => workers * layers * experts > AUTO_INT8_ABOVE,
            Precision::Int16 => false,
            Precision::Int8 => true,
            Precision::Exact => return None,
        };
        let pad = if int8 { PAD8 } else { PAD };
        let epad = experts.div_ceil(pad) * pad;
        let (first, fine) = if int8 {
            let first = Level::new(rows, idf, workers, layers, experts, epad, true)?;
            match Level::residual(rows, idf, &first, (workers, layers, experts, epad)) {
                Some(fine) => (first, Some(fine)),
                // Scales too small for a residual: one int16 level.
                None => (Level::new(rows, idf, workers, layers, experts, experts.div_ceil(PAD) * PAD, false)?, None),
            }
        } else {
            (Level::new(rows, idf, workers, layers, experts, epad, false)?, None)
        };
        let epad = match first.table {
            Table::I16(_) => experts.div_ceil(PAD) * PAD,
            Table::I8(_) => epad,
        };
        // Worst case over the kernels: AVX2 sums epad/8 products per i32 lane. Both levels take
        // the same counts, so the int16 table's limit holds for either.
        let products = (epad / 8) as u64;
        let count_limit = (i32::MAX as u64 / (products * 32767)).min(i16::MAX as u64);
        Some(Self { workers, layers, experts, epad, first, fine, count_limit, isa, all: (0..workers).collect() })
    }

    pub fn epad(&self) -> usize {
        self.epad
    }
    /// Largest count the kernel takes unscaled.
    pub fn count_limit(&self) -> u64 {
        self.count_limit
    }
    pub fn isa(&self) -> Isa {
        self.isa
    }
    pub fn precision(&self) -> &'static str {
        match (&self.first.table, &self.fine) {
            (Table::I16(_), _) => "int16",
            (Table::I8(_), Some(_)) => "int8+residual",
            (Table::I8(_), None) => "int8",
        }
    }
    /// Whether a single decoder's estimate can be narrowed ([`estimate_fine`](Self::estimate_fine)).
    pub fn has_fine(&self) -> bool {
        self.fine.is_some()
    }

    fn dims(&self) -> Dims {
        Dims { workers: self.workers, layers: self.layers, epad: self.epad }
    }

    /// Whether the first table takes u8 counts (int8 weights on AVX-512 VNNI: `vpdpbusd`, no
    /// sign extension) instead of the int16 ones.
    pub fn first_counts_u8(&self) -> bool {
        self.isa == Isa::Avx512Vnni && matches!(self.first.table, Table::I8(_))
    }

    /// Estimated Σ c·w per decoder into `est`, from the first table: `[layers][epad]` counts, u8
    /// (`c8`, `tmul8`) where [`first_counts_u8`](Self::first_counts_u8), else int16 (`c16`,
    /// `tmul`); `tmul*`: t_i per layer.
    pub fn estimate(&self, c16: &[i16], tmul: &[f32], c8: &[u8], tmul8: &[f32], est: &mut Vec<f32>) {
        est.clear();
        est.resize(self.workers, 0.0);
        self.first_kind(&self.first, &self.all, FirstCounts { c16, tmul, c8, tmul8 }, est);
    }

    /// Σ c·w of decoders `rows` from `level`, a table of the first table's kind, with the counts
    /// the first pass reads (the residual table is estimated with the first pass's counts).
    fn first_kind(&self, level: &Level, rows: &[usize], c: FirstCounts, est: &mut [f32]) {
        if self.first_counts_u8() {
            assert!(c.c8.len() >= self.layers * self.epad && c.tmul8.len() >= self.layers);
            #[cfg(target_arch = "x86_64")]
            if let Table::I8(q) = &level.table {
                // SAFETY: VNNI was detected at run time; the slices hold what `dims` says, every
                // row is a decoder of the table and epad is a multiple of 64.
                let (d, scale, unit) = (self.dims(), &level.scale, unit_t(c.tmul8, self.layers));
                unsafe { by_unit!(unit, super::x86::vnni_u8(d, c.c8, q, scale, c.tmul8, rows, est)) };
                return;
            }
            unreachable!("u8 counts only with an int8 table on x86-64");
        }
        assert!(c.c16.len() >= self.layers * self.epad && c.tmul.len() >= self.layers);
        level.estimate(self.isa, self.dims(), rows, c.c16, c.tmul, est);
    }
    /// Bounds on |Σ c·w − estimate| for every decoder into `out`, from per-layer terms of the
    /// request: h_i = Σ_e c / 2 (weight rounding), g_i = t_i / 2 or 0 (count rounding, times
    /// Σ|Q|) and r_i = ρ·t_i·Σ_e c' (the kernel's f32 rounding, times max|Q|: Σ_e c'·|Q| ≤
    /// Σ_e c'·max|Q|). Rounded in f64 (relative ≤ layers·ε, which the caller's margin covers).
    ///
    /// The weight-rounding part Σ c·ε has two bounds, and each decoder gets the smaller: the
    /// worst case Σ_i s_ki·h_i, or, centring each layer's counts on their mean μ_i, the exact
    /// Σ_i μ_i·Σ_e ε (returned in `corr`, which the caller adds to the estimate) plus
    /// Cauchy–Schwarz on the rest, ‖c − μ‖₂·‖ε_k‖₂. The second is several times tighter for
    /// counts spread over many experts; the first for counts piled on a few.
    ///
    /// Summed in f32 lanes (`lanes`: scratch for the request's terms in f32), or in f64 where an
    /// f32 sum leaves f32's range.
    pub fn error_bounds(&self, t: &Terms, lanes: &mut Vec<f32>, corr: &mut Vec<f64>, out: &mut Vec<f64>) {
        let narrowed = t.divided;
        let n = t.h.len();
        lanes.clear();
        // Rounded up without a branch: (v as f32)·(1 + 2⁻²²) ≥ v·(1 − 2⁻²⁴)²·(1 + 2⁻²²) > v, and
        // the smallest subnormal added covers a v below f32's normal range.
        const UP: f32 = 1.0 + 1.0 / (1 << 22) as f32;
        lanes.extend(t.h.iter().chain(t.r).chain(t.g).map(|&v| (v as f32) * UP + f32::from_bits(1)));
        lanes.extend(t.mu.iter().map(|&v| v as f32));
        let (h, rest) = lanes.split_at(n);
        let (r, rest) = rest.split_at(n);
        let (g, mu) = rest.split_at(n);
        if !bounds_all(&self.first, &LayerTerms { h, mu, r, g }, t.dnorm, narrowed, corr, out) {
            bounds_all(&self.first, &LayerTerms { h: t.h, mu: t.mu, r: t.r, g: t.g }, t.dnorm, narrowed, corr, out);
        }
    }

    /// Decoders `ks`' estimates from the residual level into `est` (resized to `ks`), or None
    /// without one (an int16 first table); [`bound_fine`](Self::bound_fine) gives each its
    /// correction and bound, from the count terms of the counts `input` names.
    pub fn estimate_fine(&self, ks: &[usize], input: FineCounts, scratch: &mut Vec<f32>, est: &mut Vec<f64>) -> Option<()> {
        let fine = self.fine.as_ref()?;
        assert!(ks.iter().all(|&k| k < self.workers), "a decoder of the table");
        scratch.clear();
        scratch.resize(ks.len(), 0.0);
        est.clear();
        match input {
            FineCounts::Residual { counts, first } => {
                assert_eq!(first.len(), self.workers);
                self.first_kind(fine, ks, counts, scratch);
                // The sum of two f32 in f64: exact but for exponents 29 apart (then one f64
                // rounding, far inside the interval's margin).
                est.extend(ks.iter().zip(scratch.iter()).map(|(&k, &r)| first[k] as f64 + r as f64));
            }
            FineCounts::Whole { c16, tmul } => {
                assert!(c16.len() >= self.layers * self.epad && tmul.len() >= self.layers);
                let Table::I8(q8) = &self.first.table else { unreachable!("a residual beside an int8 table") };
                let Table::I8(r) = &fine.table else { unreachable!("an int8 residual") };
                #[cfg(target_arch = "x86_64")]
                if self.isa == Isa::Avx512Vnni {
                    // SAFETY: VNNI was detected at run time; the slices hold what `dims` says and
                    // every row is a decoder of the table.
                    let (d, scale, unit) = (self.dims(), &fine.scale, unit_t(tmul, self.layers));
                    unsafe { by_unit!(unit, super::x86::vnni_i16_of8(d, c16, q8, r, RESIDUAL_SHIFT, scale, tmul, ks, scratch)) };
                    est.extend(scratch.iter().map(|&v| v as f64));
                    return Some(());
                }
                // Only the VNNI first pass reads counts other than the int16 ones.
                let _ = (q8, r);
                unreachable!("whole residual estimates only beside a u8 first pass");
            }
        }
        Some(())
    }

    /// Decoder k's residual-level estimate `est` with its correction added, and its bound (as
    /// [`error_bounds`](Self::error_bounds)). Needs the residual level.
    pub fn bound_fine(&self, k: usize, est: f64, t: &Terms) -> (f64, f64) {
        let fine = self.fine.as_ref().expect("a residual level beside the int8 one");
        let (corr, bound) = fine.bound(k, self.layers, t);
        (est + corr, bound)
    }

    /// ρ: the kernel's f32 rounding relative to Σ of its absolute terms (conversion, one rounding
    /// per layer, the lane reduction), doubled for margin.
    pub fn rounding(&self) -> f64 {
        2.0 * (self.layers as f64 + 8.0) * (f32::EPSILON as f64 / 2.0)
    }

    pub fn experts(&self) -> usize {
        self.experts
    }
}

/// The counts the first pass reads: int16 (`c16`, `tmul`), or u8 (`c8`, `tmul8`) where
/// [`Quantized::first_counts_u8`].
#[derive(Debug, Clone, Copy)]
pub struct FirstCounts<'a> {
    pub c16: &'a [i16],
    pub tmul: &'a [f32],
    pub c8: &'a [u8],
    pub tmul8: &'a [f32],
}

/// How [`Quantized::estimate_fine`] narrows: `Residual` adds the residual table's estimate, with
/// the first pass's counts, to the first pass's own (`first`, every decoder's); `Whole` computes
/// Σ c16·(128·Q8 + R) afresh from the int16 counts, where the first pass read u8 counts divided
/// more than those (long prompts: a residual on top of coarser counts would narrow little).
#[derive(Debug, Clone, Copy)]
pub enum FineCounts<'a> {
    Residual { counts: FirstCounts<'a>, first: &'a [f32] },
    Whole { c16: &'a [i16], tmul: &'a [f32] },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub workers: usize,
    pub layers: usize,
    pub epad: usize,
}

fn portable<T: Copy + Into<i32>>(
    d: Dims,
    counts: &[i16],
    q: &[T],
    scale: &[f32],
    tmul: &[f32],
    rows: &[usize],
    est: &mut [f32],
) {
    for (&k, out) in rows.iter().zip(est.iter_mut()) {
        let mut acc = 0.0f32;
        for i in 0..d.layers {
            let c = &counts[i * d.epad..][..d.epad];
            let qr = &q[(k * d.layers + i) * d.epad..][..d.epad];
            let dot: i64 = c.iter().zip(qr).map(|(&a, &b)| a as i64 * b.into() as i64).sum();
            acc += dot as f32 * (scale[k * d.layers + i] * tmul[i]);
        }
        *out = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(rng: &mut fastrand::Rng, workers: usize, layers: usize, experts: usize, int8: bool) -> Level {
        let rows: Vec<f32> = (0..workers * layers * experts).map(|_| rng.f32()).collect();
        let idf: Vec<f32> = (0..layers * experts).map(|_| 0.05 + 3.0 * rng.f32()).collect();
        let pad = if int8 { PAD8 } else { PAD };
        Level::new(&rows, &idf, workers, layers, experts, experts.div_ceil(pad) * pad, int8).unwrap()
    }

    /// `error_bounds` (f32 sums, rounded-up terms) gives bounds at least the f64 sums' (less 1e-9
    /// of them) and corrections within γ·worst of theirs; terms past f32's range fall back to
    /// the f64 sums (which then give the same values).
    #[test]
    fn f32_bound_sums_cover_the_f64_ones() {
        let mut rng = fastrand::Rng::with_seed(3);
        for case in 0..300 {
            let (workers, layers, experts) = (rng.usize(1..40), rng.usize(1..70), [8, 64, 128][case % 3]);
            let lv = level(&mut rng, workers, layers, experts, case % 2 == 0);
            let big = if case % 10 == 0 { 1e40 } else { 1.0 };
            let v = |rng: &mut fastrand::Rng, scale: f64| -> Vec<f64> { (0..layers).map(|_| rng.f64() * scale).collect() };
            let (h, mu, r) = (v(&mut rng, 500.0 * big), v(&mut rng, 8.0), v(&mut rng, 1e-3));
            let g = if case % 3 == 0 { v(&mut rng, 4.0) } else { vec![0.0; layers] };
            let narrowed = g.iter().any(|&x| x != 0.0);
            let dnorm = rng.f64() * 100.0;
            let (mut c32, mut b32, mut c64, mut b64) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let terms = Terms { h: &h, g: &g, r: &r, mu: &mu, dnorm, divided: narrowed };
            let q = Quantized { workers, layers, experts, epad: 0, first: lv.clone(), fine: None, count_limit: 0, isa: Isa::Portable, all: Vec::new() };
            q.error_bounds(&terms, &mut Vec::new(), &mut c32, &mut b32);
            let lanes: Vec<f32> = h.iter().chain(&r).chain(&g).map(|&x| up_f32(x)).chain(mu.iter().map(|&x| x as f32)).collect();
            let (h32, rest) = lanes.split_at(layers);
            let (r32, rest) = rest.split_at(layers);
            let (g32, mu32) = rest.split_at(layers);
            let ok = bounds_all(&lv, &LayerTerms { h: h32, mu: mu32, r: r32, g: g32 }, dnorm, narrowed, &mut Vec::new(), &mut Vec::new());
            assert!(bounds_all(&lv, &LayerTerms { h: &h, mu: &mu, r: &r, g: &g }, dnorm, narrowed, &mut c64, &mut b64));
            assert_eq!(ok, big == 1.0, "case {case}: f32 sums of terms up to {big} should {}fit", if ok { "not " } else { "" });
            for k in 0..workers {
                let worst: f64 = (0..layers).map(|i| lv.scale[k * layers + i] as f64 * h[i]).sum();
                let gamma = (layers as f64 + 8.0) * f32::EPSILON as f64;
                assert!(b32[k] >= b64[k] * (1.0 - 1e-9), "case {case} k={k}: {} < {}", b32[k], b64[k]);
                assert!((c32[k] - c64[k]).abs() <= gamma * worst + 1e-30, "case {case} k={k}: {} vs {}", c32[k], c64[k]);
            }
        }
    }
}
