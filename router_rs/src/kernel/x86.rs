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

/// The counts pass (`model::prepare_layer`) for i32 counts whose first element sits at lane 0 of
/// the rule's accumulators: squares[j mod 32] += (c·idf)² with the same IEEE operations in the
/// same order as the scalar loop (convert, multiply, square, add; no contraction), so the norm
/// has the same bits. Also writes clamp(c, −1, i16::MAX) to `c16` and returns (Σ, min, max) of
/// what it wrote, each fold starting at 0. Needs `c.len() ≤ 65 536` (the i32 sum).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn prepare_i32_avx512(c: &[i32], idf: &[f64], squares: &mut [f64; 32], c16: &mut [i16]) -> (i64, i16, i16) {
    debug_assert!(c.len() == idf.len() && c.len() == c16.len() && c.len() <= 1 << 16);
    let n = c.len() / 32 * 32;
    let (cp, wp, sp, op) = (c.as_ptr(), idf.as_ptr(), squares.as_mut_ptr(), c16.as_mut_ptr());
    let mut sq = [_mm512_loadu_pd(sp), _mm512_loadu_pd(sp.add(8)), _mm512_loadu_pd(sp.add(16)), _mm512_loadu_pd(sp.add(24))];
    let (lo, hi) = (_mm512_set1_epi32(-1), _mm512_set1_epi32(i16::MAX as i32));
    let (mut vmin, mut vmax, mut vsum) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
    let mut j = 0;
    while j < n {
        for h in 0..2 {
            let v = _mm512_loadu_si512(cp.add(j + 16 * h) as *const _);
            let halves = [_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v)];
            for (q, half) in halves.into_iter().enumerate() {
                let x = _mm512_mul_pd(_mm512_cvtepi32_pd(half), _mm512_loadu_pd(wp.add(j + 16 * h + 8 * q)));
                sq[2 * h + q] = _mm512_add_pd(sq[2 * h + q], _mm512_mul_pd(x, x));
            }
            let k = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
            vmin = _mm512_min_epi32(vmin, k);
            vmax = _mm512_max_epi32(vmax, k);
            vsum = _mm512_add_epi32(vsum, k);
            _mm256_storeu_si256(op.add(j + 16 * h) as *mut __m256i, _mm512_cvtepi32_epi16(k));
        }
        j += 32;
    }
    for (i, v) in sq.iter().enumerate() {
        _mm512_storeu_pd(sp.add(8 * i), *v);
    }
    let folds = (_mm512_reduce_add_epi32(vsum) as i64, _mm512_reduce_min_epi32(vmin) as i16, _mm512_reduce_max_epi32(vmax) as i16);
    prepare_tail(c, idf, n, squares, c16, folds)
}

/// [`prepare_i32_avx512`] on AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn prepare_i32_avx2(c: &[i32], idf: &[f64], squares: &mut [f64; 32], c16: &mut [i16]) -> (i64, i16, i16) {
    debug_assert!(c.len() == idf.len() && c.len() == c16.len() && c.len() <= 1 << 16);
    let n = c.len() / 32 * 32;
    let (cp, wp, sp, op) = (c.as_ptr(), idf.as_ptr(), squares.as_mut_ptr(), c16.as_mut_ptr());
    let mut sq = [_mm256_setzero_pd(); 8];
    for (i, v) in sq.iter_mut().enumerate() {
        *v = _mm256_loadu_pd(sp.add(4 * i));
    }
    let (lo, hi) = (_mm256_set1_epi32(-1), _mm256_set1_epi32(i16::MAX as i32));
    let (mut vmin, mut vmax, mut vsum) = (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
    let mut j = 0;
    while j < n {
        for h in 0..2 {
            let mut k = [_mm256_setzero_si256(); 2];
            for (p, kp) in k.iter_mut().enumerate() {
                let at = j + 16 * h + 8 * p;
                let v = _mm256_loadu_si256(cp.add(at) as *const __m256i);
                let halves = [_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)];
                for (q, half) in halves.into_iter().enumerate() {
                    let lane = 4 * h + 2 * p + q;
                    let x = _mm256_mul_pd(_mm256_cvtepi32_pd(half), _mm256_loadu_pd(wp.add(at + 4 * q)));
                    sq[lane] = _mm256_add_pd(sq[lane], _mm256_mul_pd(x, x));
                }
                *kp = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
                vmin = _mm256_min_epi32(vmin, *kp);
                vmax = _mm256_max_epi32(vmax, *kp);
                vsum = _mm256_add_epi32(vsum, *kp);
            }
            // packs works within 128-bit halves: 0xD8 puts the four quarters back in order.
            let packed = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(k[0], k[1]));
            _mm256_storeu_si256(op.add(j + 16 * h) as *mut __m256i, packed);
        }
        j += 32;
    }
    for (i, v) in sq.iter().enumerate() {
        _mm256_storeu_pd(sp.add(4 * i), *v);
    }
    let mut lanes = [[0i32; 8]; 3];
    for (out, v) in lanes.iter_mut().zip([vsum, vmin, vmax]) {
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v);
    }
    let folds = (
        lanes[0].iter().map(|&v| v as i64).sum(),
        lanes[1].iter().fold(0, |m, &v| m.min(v)) as i16,
        lanes[2].iter().fold(0, |m, &v| m.max(v)) as i16,
    );
    prepare_tail(c, idf, n, squares, c16, folds)
}

/// The elements from `n` on (fewer than 32), scalar, continuing the folds.
fn prepare_tail(c: &[i32], idf: &[f64], n: usize, squares: &mut [f64; 32], c16: &mut [i16], folds: (i64, i16, i16)) -> (i64, i16, i16) {
    let (mut sum, mut min, mut max) = folds;
    for t in n..c.len() {
        let x = c[t] as f64 * idf[t];
        squares[t - n] += x * x;
        let k = c[t].clamp(-1, i16::MAX as i32) as i16;
        c16[t] = k;
        sum += k as i64;
        min = min.min(k);
        max = max.max(k);
    }
    (sum, min, max)
}
