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

/// What the counts pass folds out of one layer's int16 counts c16: Σ, Σ c16², min and max, each
/// starting at 0. `sumsq` is summed in wrapping i32 (the same bits in any order): exact while
/// len · max² < 2^31 (the caller recomputes it from the counts otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Folds {
    pub sum: i64,
    pub sumsq: i32,
    pub min: i16,
    pub max: i16,
}

/// The explicit-SIMD counts pass for one layer's i32 counts (`x86::prepare_i32_avx512`): an f32
/// estimate of Σ (c·idf)² added to `sq` (relative error within [`norm_rho`]), the int16 counts (and
/// the u8 ones, min(c, 255), where `c8` is given: AVX-512 only) and their folds; None where it
/// does not apply (then the caller's generic loop computes the rule's
/// own f64 squares).
pub(crate) fn prepare_i32(isa: Isa, c: &[i32], idf: &[f32], sq: &mut [f64; 16], c16: &mut [i16], c8: Option<&mut [u8]>) -> Option<Folds> {
    if c.len() > 1 << 16 || c.len() != idf.len() || c.len() != c16.len() || c8.as_ref().is_some_and(|c8| c8.len() != c.len()) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the ISA was detected at run time and the slices have equal lengths ≤ 2^16.
        unsafe {
            match isa {
                Isa::Avx512Vnni => return Some(x86::prepare_i32_avx512(c, idf, sq, c16, c8)),
                Isa::Avx2 if c8.is_none() => return Some(x86::prepare_i32_avx2(c, idf, sq, c16)),
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
