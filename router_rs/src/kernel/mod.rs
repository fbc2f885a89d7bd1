//! Scoring kernels. [`exact`] is the rule itself (f64, a fixed summation order, the same bits on
//! every build); [`quant`] gives fixed-point estimates of it with a certified error bound, so a
//! decision needs the exact score only of the few decoders near a boundary.
pub mod exact;
pub mod quant;
use multiversion::multiversion;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Which estimate kernel this CPU runs (chosen once at run time, never by compile flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    Avx2,
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("ELDR_ROUTER_ISA").is_some_and(|v| v == "portable") {
                return Isa::Portable;
            }
            let avx2_only = std::env::var_os("ELDR_ROUTER_ISA").is_some_and(|v| v == "avx2");
            if !avx2_only
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512Vnni;
            }
            if is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

/// What the counts pass folds out of one layer's int16 counts c16: Σ and Σ c16². `sumsq` is
/// summed in wrapping i32 (the same bits in any order): exact while len · max² < 2^31 (the
/// caller recomputes it from the counts otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Folds {
    pub sum: i64,
    pub sumsq: i32,
}

/// What the counts pass folds out of every kept layer at once: the largest int16 count (from 0)
/// and whether a count was negative. One pair per request, so the common case (no count above
/// the kernel's limit, none negative) is settled with one comparison instead of one per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extremes {
    pub max: i16,
    pub negative: bool,
}

impl Extremes {
    pub fn merge(self, other: Extremes) -> Extremes {
        Extremes { max: self.max.max(other.max), negative: self.negative | other.negative }
    }
}

/// The explicit-SIMD counts pass over the kept layers of i32 counts `[layers][e]`
/// (`x86::prepare_layers_avx512`), one call per request: for the i-th kept layer l, an f32
/// estimate of Σ (c_l·idf_i)² added to `sq` (relative error within [`norm_rho`]), the int16
/// counts min(c, i16::MAX) at `c16[i·epad..][..e]` (and the u8 ones, min(c, 255), in `c8` where
/// given: AVX-512 only; a negative count, which the caller refuses, leaves both unspecified),
/// and the layer's folds in `folds` (resized to the kept layers; `kept` ascending, so its last
/// bounds them all); returns the extremes over every kept layer. None
/// where it does not apply (then the caller's generic loop computes the rule's own f64 squares).
#[allow(clippy::too_many_arguments)]
pub(crate) fn prepare_i32(
    isa: Isa,
    c: &[i32],
    kept: &[usize],
    (e, epad): (usize, usize),
    idf: &[f32],
    sq: &mut [f64; 16],
    c16: &mut [i16],
    c8: Option<&mut [u8]>,
    folds: &mut Vec<Folds>,
) -> Option<Extremes> {
    let n = kept.len();
    if e > 1 << 16
        || epad < e
        || idf.len() != n * e
        || c16.len() < n * epad
        || c8.as_ref().is_some_and(|c8| c8.len() < n * epad)
        || kept.last().is_some_and(|&l| (l + 1) * e > c.len())
    {
        return None;
    }
    // Every fold is written below.
    folds.resize(n, Folds { sum: 0, sumsq: 0 });
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the ISA was detected at run time and every layer's slices were checked above.
        unsafe {
            match isa {
                Isa::Avx512Vnni => return Some(x86::prepare_layers_avx512(c, kept, (e, epad), idf, sq, c16, c8, folds)),
                Isa::Avx2 if c8.is_none() => return Some(x86::prepare_layers_avx2(c, kept, (e, epad), idf, sq, c16, folds)),
                Isa::Avx2 | Isa::Portable => {}
            }
        }
    }
    let _ = (isa, sq, c8);
    None
}

/// Bound on the relative error of [`prepare_i32`]'s Σ (c·idf)² for layers of `experts` counts:
/// per term ≤ 5 f32 roundings (the conversion, the product, the square, the tail's add), per
/// lane ≤ ⌈experts/32⌉ + 3 more (its chain and the pairing), then f64 sums; doubled for margin.
pub fn norm_rho(experts: usize) -> f64 {
    2.0 * (experts.div_ceil(32) + 8) as f64 * (f32::EPSILON as f64 / 2.0) + 1e-12
}

/// Σ a·b in eight independent lanes, so it vectorises (a strict left-to-right f64 sum cannot).
/// For sums that need no fixed order: error bounds and predictions, never the rule itself.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub(crate) fn lane_dot(a: &[f64], b: &[f64]) -> f64 {
    const N: usize = 8;
    let mut acc = [0.0f64; N];
    let (mut ac, mut bc) = (a.chunks_exact(N), b.chunks_exact(N));
    for (x, y) in (&mut ac).zip(&mut bc) {
        for j in 0..N {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}
