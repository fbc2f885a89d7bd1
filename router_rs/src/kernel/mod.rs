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

/// The explicit-SIMD counts pass for i32 counts that start at lane 0 (see
/// `x86::prepare_i32_avx512`), or None where it does not apply: the caller's generic loop then
/// does the same work.
pub(crate) fn prepare_i32(isa: Isa, c: &[i32], idf: &[f64], offset: usize, squares: &mut [f64; exact::LANES], c16: &mut [i16]) -> Option<(i64, i16, i16)> {
    if offset != 0 || c.len() > 1 << 16 || c.len() != idf.len() || c.len() != c16.len() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the ISA was detected at run time and the slices have equal lengths ≤ 2^16.
        unsafe {
            match isa {
                Isa::Avx512Vnni => return Some(x86::prepare_i32_avx512(c, idf, squares, c16)),
                Isa::Avx2 => return Some(x86::prepare_i32_avx2(c, idf, squares, c16)),
                Isa::Portable => {}
            }
        }
    }
    let _ = (isa, squares);
    None
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
