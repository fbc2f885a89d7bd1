//! Estimate kernels with explicit intrinsics (chosen at run time by [`super::Isa::detect`]), so a
//! `-C target-cpu=native` build runs the same code as a generic one. Each (decoder, layer) dot of
//! int16 counts with int16/int8 weights accumulates in i32 lanes (no overflow: counts are kept
//! under `Quantized::count_limit`), is converted to f32 and scaled by an exact power of two.
use super::quant::Dims;
use std::arch::x86_64::*;

/// Decoders per pass: each counts vector loaded serves this many weight rows.
const GROUP: usize = 4;

macro_rules! vnni_kernel {
    ($name:ident, $t:ty, $load:expr) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        pub(crate) unsafe fn $name(
            d: Dims,
            counts: &[i16],
            q: &[$t],
            scale: &[f32],
            tmul: &[f32],
            est: &mut [f32],
        ) {
            let (cp, qp) = (counts.as_ptr(), q.as_ptr());
            let mut k0 = 0;
            while k0 < d.workers {
                let g = GROUP.min(d.workers - k0);
                let mut acc = [_mm512_setzero_ps(); GROUP];
                for i in 0..d.layers {
                    let mut dot = [_mm512_setzero_si512(); GROUP];
                    let mut e = 0;
                    while e < d.epad {
                        let cv = _mm512_loadu_si512(cp.add(i * d.epad + e) as *const _);
                        for j in 0..g {
                            let qv = $load(qp.add(((k0 + j) * d.layers + i) * d.epad + e));
                            dot[j] = _mm512_dpwssd_epi32(dot[j], cv, qv);
                        }
                        e += 32;
                    }
                    for j in 0..g {
                        let s = _mm512_set1_ps(*scale.get_unchecked((k0 + j) * d.layers + i) * *tmul.get_unchecked(i));
                        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j]), s, acc[j]);
                    }
                }
                for j in 0..g {
                    est[k0 + j] = _mm512_reduce_add_ps(acc[j]);
                }
                k0 += g;
            }
        }
    };
}

macro_rules! avx2_kernel {
    ($name:ident, $t:ty, $load:expr) => {
        #[target_feature(enable = "avx2")]
        pub(crate) unsafe fn $name(
            d: Dims,
            counts: &[i16],
            q: &[$t],
            scale: &[f32],
            tmul: &[f32],
            est: &mut [f32],
        ) {
            let (cp, qp) = (counts.as_ptr(), q.as_ptr());
            let mut k0 = 0;
            while k0 < d.workers {
                let g = GROUP.min(d.workers - k0);
                let mut acc = [_mm256_setzero_ps(); GROUP];
                for i in 0..d.layers {
                    let mut dot = [_mm256_setzero_si256(); GROUP];
                    let mut e = 0;
                    while e < d.epad {
                        let cv = _mm256_loadu_si256(cp.add(i * d.epad + e) as *const __m256i);
                        for j in 0..g {
                            let qv = $load(qp.add(((k0 + j) * d.layers + i) * d.epad + e));
                            dot[j] = _mm256_add_epi32(dot[j], _mm256_madd_epi16(cv, qv));
                        }
                        e += 16;
                    }
                    for j in 0..g {
                        let s = _mm256_set1_ps(*scale.get_unchecked((k0 + j) * d.layers + i) * *tmul.get_unchecked(i));
                        acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_cvtepi32_ps(dot[j]), s));
                    }
                }
                for j in 0..g {
                    est[k0 + j] = hsum256(acc[j]);
                }
                k0 += g;
            }
        }
    };
}

#[target_feature(enable = "avx2")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load512_i16(p: *const i16) -> __m512i {
    _mm512_loadu_si512(p as *const _)
}
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load512_i8(p: *const i8) -> __m512i {
    _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i))
}
#[target_feature(enable = "avx2")]
unsafe fn load256_i16(p: *const i16) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}
#[target_feature(enable = "avx2")]
unsafe fn load256_i8(p: *const i8) -> __m256i {
    _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i))
}

vnni_kernel!(vnni_i16, i16, load512_i16);
vnni_kernel!(vnni_i8, i8, load512_i8);
avx2_kernel!(avx2_i16, i16, load256_i16);
avx2_kernel!(avx2_i8, i8, load256_i8);
