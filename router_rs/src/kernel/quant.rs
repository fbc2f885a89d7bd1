//! Fixed-point centroids with the IDF folded in: for decoder k and kept layer i, the weights
//! w = idf · c_k are stored as integers Q times a power of two s_ki (int16, or int8 for large
//! fleets), and a prompt's counts as int16 (divided by a power of two t_i in the rare layer whose
//! counts exceed the kernel's overflow-free limit). The estimate Σ_i s_ki·t_i·Σ_e c'·Q comes with
//! a bound that holds for any input:
//!   |Σ c·w − estimate| ≤ Σ_i s_ki·(Σ_e c / 2 + [t_i > 1]·t_i/2·Σ_e |Q|) + the f32 rounding term,
//! since |w − s·Q| ≤ s/2 and |c − t·c'| ≤ t/2 per element. Powers of two keep every scaling exact.
use super::{lane_dot, Isa};

/// Which integer width holds the centroids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Exact below 512 dimensions; else int16 unless its table would pass 64 MiB, int8 above. (Measured here: int8's coarser
    /// intervals send more decoders to exact refinement, which costs more than the memory saved
    /// at every fleet size up to 1024 decoders of (58, 256).)
    Auto,
    Int16,
    Int8,
    /// No fixed point: every score computed exactly (the reference the others must agree with).
    Exact,
}

/// Above this many weights (W × D) `Auto` stores int8.
pub const AUTO_INT8_ABOVE: usize = 1 << 25;
/// Experts per layer are padded to this many int16 lanes (one AVX-512 register).
const PAD: usize = 32;

#[derive(Debug, Clone)]
enum Table {
    I16(Vec<i16>),
    I8(Vec<i8>),
}

#[derive(Debug, Clone)]
pub struct Quantized {
    workers: usize,
    layers: usize,
    experts: usize,
    epad: usize,
    table: Table,
    /// s_ki, `[W][layers]`.
    scale: Vec<f32>,
    /// s_ki, s_ki·Σ_e |Q_kie| and s_ki·max_e |Q_kie| as f64 (exact: s is a power of two),
    /// `[W][layers]`.
    scale64: Vec<f64>,
    abs_q: Vec<f64>,
    max_q: Vec<f64>,
    count_limit: u64,
    isa: Isa,
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

impl Quantized {
    /// `rows`: unit centroids `[W][layers·experts]`; `idf`: `[layers][experts]` of the kept layers.
    /// None when a weight is outside the range a power-of-two scale covers (then every score is
    /// computed exactly).
    pub fn new(rows: &[f32], idf: &[f32], workers: usize, layers: usize, experts: usize, precision: Precision) -> Option<Self> {
        let dim = layers * experts;
        let int8 = match precision {
            Precision::Auto => workers * dim > AUTO_INT8_ABOVE,
            Precision::Int16 => false,
            Precision::Int8 => true,
            Precision::Exact => return None,
        };
        let qmax = if int8 { 127.0 } else { 32767.0 };
        let epad = experts.div_ceil(PAD) * PAD;
        let mut q = vec![0i32; workers * layers * epad];
        let mut scale = Vec::with_capacity(workers * layers);
        let mut abs_q = Vec::with_capacity(workers * layers);
        let mut max_q = Vec::with_capacity(workers * layers);
        let mut w = vec![0.0f64; experts];
        for k in 0..workers {
            for i in 0..layers {
                let row = &rows[k * dim + i * experts..][..experts];
                for (e, wv) in w.iter_mut().enumerate() {
                    // Exact: a product of two f32 fits in f64's mantissa.
                    *wv = idf[i * experts + e] as f64 * row[e] as f64;
                }
                let m = w.iter().fold(0.0f64, |a, v| a.max(v.abs()));
                let ex = exponent(m, qmax)?;
                let s = pow2_f64(ex);
                let out = &mut q[(k * layers + i) * epad..][..experts];
                let (mut a, mut mx) = (0.0, 0.0f64);
                for (o, wv) in out.iter_mut().zip(&w) {
                    *o = (wv / s).round() as i32;
                    a += o.unsigned_abs() as f64;
                    mx = mx.max(o.unsigned_abs() as f64);
                }
                scale.push(pow2_f32(ex));
                abs_q.push(a * s);
                max_q.push(mx * s);
            }
        }
        let table = if int8 {
            Table::I8(q.iter().map(|&v| v as i8).collect())
        } else {
            Table::I16(q.iter().map(|&v| v as i16).collect())
        };
        // Worst case over the kernels: AVX2 sums epad/8 products per i32 lane.
        let products = (epad / 8) as u64;
        let count_limit = (i32::MAX as u64 / (products * qmax as u64)).min(i16::MAX as u64);
        let scale64 = scale.iter().map(|&v| v as f64).collect();
        Some(Self { workers, layers, experts, epad, table, scale, scale64, abs_q, max_q, count_limit, isa: Isa::detect() })
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
        match self.table {
            Table::I16(_) => "int16",
            Table::I8(_) => "int8",
        }
    }

    /// Estimated Σ c·w per decoder into `est`. `counts`: `[layers][epad]` int16, `tmul`: t_i per
    /// layer.
    pub fn estimate(&self, counts: &[i16], tmul: &[f32], est: &mut Vec<f32>) {
        assert!(counts.len() >= self.layers * self.epad && tmul.len() >= self.layers);
        est.clear();
        est.resize(self.workers, 0.0);
        let dims = Dims { workers: self.workers, layers: self.layers, epad: self.epad };
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86;
            // SAFETY: the ISA was detected at run time and every slice holds what `dims` says.
            unsafe {
                match (self.isa, &self.table) {
                    (Isa::Avx512Vnni, Table::I16(q)) => return x86::vnni_i16(dims, counts, q, &self.scale, tmul, est),
                    (Isa::Avx512Vnni, Table::I8(q)) => return x86::vnni_i8(dims, counts, q, &self.scale, tmul, est),
                    (Isa::Avx2, Table::I16(q)) => return x86::avx2_i16(dims, counts, q, &self.scale, tmul, est),
                    (Isa::Avx2, Table::I8(q)) => return x86::avx2_i8(dims, counts, q, &self.scale, tmul, est),
                    (Isa::Portable, _) => {}
                }
            }
        }
        match &self.table {
            Table::I16(q) => portable(dims, counts, q, &self.scale, tmul, est),
            Table::I8(q) => portable(dims, counts, q, &self.scale, tmul, est),
        }
    }

    /// Bounds on |Σ c·w − estimate| for every decoder into `out`, from per-layer terms of the
    /// request: h_i = Σ_e c / 2 (weight rounding), g_i = t_i / 2 or 0 (count rounding, times
    /// Σ|Q|) and r_i = ρ·t_i·Σ_e c' (the kernel's f32 rounding, times max|Q|: Σ_e c'·|Q| ≤
    /// Σ_e c'·max|Q|). Rounded in f64 (relative ≤ layers·ε, which the caller's margin covers).
    pub fn error_bounds(&self, h: &[f64], g: &[f64], r: &[f64], out: &mut Vec<f64>) {
        let l = self.layers;
        let narrowed = g.iter().any(|&v| v != 0.0);
        out.clear();
        for k in 0..self.workers {
            let at = k * l..(k + 1) * l;
            let mut total = lane_dot(&self.scale64[at.clone()], h) + lane_dot(&self.max_q[at.clone()], r);
            if narrowed {
                total += lane_dot(&self.abs_q[at], g);
            }
            out.push(total);
        }
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
    est: &mut [f32],
) {
    for k in 0..d.workers {
        let mut acc = 0.0f32;
        for i in 0..d.layers {
            let c = &counts[i * d.epad..][..d.epad];
            let qr = &q[(k * d.layers + i) * d.epad..][..d.epad];
            let dot: i64 = c.iter().zip(qr).map(|(&a, &b)| a as i64 * b.into() as i64).sum();
            acc += dot as f32 * (scale[k * d.layers + i] * tmul[i]);
        }
        est[k] = acc;
    }
}
