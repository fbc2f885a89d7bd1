//! Estimate kernels with explicit intrinsics (chosen at run time by [`super::Isa::detect`]), so a
//! `-C target-cpu=native` build runs the same code as a generic one. Each (decoder, layer) dot of
//! int16 counts with int16/int8 weights (u8 counts with int8 weights on VNNI) accumulates in i32
//! lanes (no overflow: counts are kept under `Quantized::count_limit`), is converted to f32 and
//! scaled by an exact power of two. Each kernel takes `UNIT_T`: true only where every count
//! divisor t_i in `tmul` is 1 (the caller checks).
use super::quant::Dims;
use super::Folds;
use std::arch::x86_64::*;

/// Decoders per pass: each counts vector loaded serves this many weight rows.
const GROUP: usize = 4;

macro_rules! vnni_kernel {
    ($name:ident, $c:ty, $t:ty, $load:expr, $step:expr, $dot:ident) => {
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        pub(crate) unsafe fn $name<const UNIT_T: bool>(
            d: Dims,
            counts: &[$c],
            q: &[$t],
            scale: &[f32],
            tmul: &[f32],
            rows: &[usize],
            est: &mut [f32],
        ) {
            let (cp, qp) = (counts.as_ptr(), q.as_ptr());
            let mut k0 = 0;
            while k0 < rows.len() {
                let g = GROUP.min(rows.len() - k0);
                let row: [usize; GROUP] = std::array::from_fn(|j| rows[(k0 + j).min(rows.len() - 1)]);
                let mut acc = [_mm512_setzero_ps(); GROUP];
                for i in 0..d.layers {
                    let mut dot = [_mm512_setzero_si512(); GROUP];
                    let mut e = 0;
                    while e < d.epad {
                        let cv = _mm512_loadu_si512(cp.add(i * d.epad + e) as *const _);
                        for j in 0..g {
                            let qv = $load(qp.add((row[j] * d.layers + i) * d.epad + e));
                            dot[j] = $dot(dot[j], cv, qv);
                        }
                        e += $step;
                    }
                    for j in 0..g {
                        let s = _mm512_set1_ps(scaled::<UNIT_T>(scale, row[j] * d.layers + i, tmul, i));
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
        pub(crate) unsafe fn $name<const UNIT_T: bool>(
            d: Dims,
            counts: &[i16],
            q: &[$t],
            scale: &[f32],
            tmul: &[f32],
            rows: &[usize],
            est: &mut [f32],
        ) {
            let (cp, qp) = (counts.as_ptr(), q.as_ptr());
            let mut k0 = 0;
            while k0 < rows.len() {
                let g = GROUP.min(rows.len() - k0);
                let row: [usize; GROUP] = std::array::from_fn(|j| rows[(k0 + j).min(rows.len() - 1)]);
                let mut acc = [_mm256_setzero_ps(); GROUP];
                for i in 0..d.layers {
                    let mut dot = [_mm256_setzero_si256(); GROUP];
                    let mut e = 0;
                    while e < d.epad {
                        let cv = _mm256_loadu_si256(cp.add(i * d.epad + e) as *const __m256i);
                        for j in 0..g {
                            let qv = $load(qp.add((row[j] * d.layers + i) * d.epad + e));
                            dot[j] = _mm256_add_epi32(dot[j], _mm256_madd_epi16(cv, qv));
                        }
                        e += 16;
                    }
                    for j in 0..g {
                        let s = _mm256_set1_ps(scaled::<UNIT_T>(scale, row[j] * d.layers + i, tmul, i));
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

/// s_ki·t_i; with `UNIT_T` (every t_i is 1, the caller checked) s_ki alone, one load and no
/// multiply per decoder and layer: measurable where E = 128 gives only two `vpdpbusd` per layer.
#[inline(always)]
unsafe fn scaled<const UNIT_T: bool>(scale: &[f32], at: usize, tmul: &[f32], i: usize) -> f32 {
    let s = *scale.get_unchecked(at);
    if UNIT_T {
        s
    } else {
        s * *tmul.get_unchecked(i)
    }
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
#[target_feature(enable = "avx512f")]
unsafe fn load512_i8(p: *const i8) -> __m512i {
    _mm512_loadu_si512(p as *const _)
}
#[target_feature(enable = "avx2")]
unsafe fn load256_i16(p: *const i16) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}
#[target_feature(enable = "avx2")]
unsafe fn load256_i8(p: *const i8) -> __m256i {
    _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i))
}

vnni_kernel!(vnni_i16, i16, i16, load512_i16, 32, _mm512_dpwssd_epi32);
// u8 counts × int8 weights (`vpdpbusd`: four u8·i8 products per i32 lane, no sign extension), half
// the bytes of the int16 table; `d.epad` must be a multiple of 64.
vnni_kernel!(vnni_u8, u8, i8, load512_i8, 64, _mm512_dpbusd_epi32);
avx2_kernel!(avx2_i16, i16, load256_i16);
avx2_kernel!(avx2_i8, i8, load256_i8);

/// [`super::prepare_i32`] on AVX-512: [`prepare_i32_avx512`] per kept layer, inlined into one
/// loop (a call per layer, with its folds returned through memory, cost more than the pass).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn prepare_layers_avx512(
    c: &[i32],
    kept: &[usize],
    (e, epad): (usize, usize),
    idf: &[f32],
    sq: &mut [f64; 16],
    c16: &mut [i16],
    mut c8: Option<&mut [u8]>,
    folds: &mut Vec<Folds>,
) {
    for (i, &l) in kept.iter().enumerate() {
        let c8 = c8.as_deref_mut().map(|c8| &mut c8[i * epad..][..e]);
        folds.push(prepare_i32_avx512(&c[l * e..][..e], &idf[i * e..][..e], sq, &mut c16[i * epad..][..e], c8));
    }
}

/// [`prepare_layers_avx512`] on AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn prepare_layers_avx2(c: &[i32], kept: &[usize], (e, epad): (usize, usize), idf: &[f32], sq: &mut [f64; 16], c16: &mut [i16], folds: &mut Vec<Folds>) {
    for (i, &l) in kept.iter().enumerate() {
        folds.push(prepare_i32_avx2(&c[l * e..][..e], &idf[i * e..][..e], sq, &mut c16[i * epad..][..e]));
    }
}

/// The counts pass for one layer's i32 counts: adds an f32 estimate of Σ (c·idf)² to `sq` (f32
/// products and sums within the call, two chains, flushed to 16 f64 lanes at its end; each
/// lane's f32 part takes at most ⌈len/32⌉ + 1 roundings, `super::norm_rho` bounds the relative
/// error), writes clamp(c, −1, i16::MAX) to `c16` (and min(c, 255) to `c8` if given; a negative
/// count, which the caller refuses, leaves its u8 unspecified) and returns the folds of what it
/// wrote to `c16`. Per 32 counts: one saturating pack to int16 (`vpmovsdw`), then Σ and Σ c² of
/// the packed pairs (`vpmaddwd` with ones and with itself), the sign bits OR-ed, and the u8
/// counts from the packed ones (`vpmovuswb`).
/// Needs `c.len() ≤ 65 536` (the i32 sum).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn prepare_i32_avx512(c: &[i32], idf: &[f32], sq: &mut [f64; 16], c16: &mut [i16], c8: Option<&mut [u8]>) -> Folds {
    debug_assert!(c.len() == idf.len() && c.len() == c16.len() && c.len() <= 1 << 16);
    debug_assert!(c8.as_ref().is_none_or(|c8| c8.len() == c.len()));
    let n = c.len() / 32 * 32;
    let (cp, wp, op) = (c.as_ptr(), idf.as_ptr(), c16.as_mut_ptr());
    let u8p = c8.map(|c8| c8.as_mut_ptr());
    let mut acc = [_mm512_setzero_ps(); 2];
    let (lo, ones) = (_mm512_set1_epi32(-1), _mm512_set1_epi16(1));
    let (mut vmax, mut vneg, mut vsum, mut vsq) = (_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512());
    let mut j = 0;
    while j < n {
        let mut packed = [_mm256_setzero_si256(); 2];
        for (h, out) in packed.iter_mut().enumerate() {
            let v = _mm512_loadu_si512(cp.add(j + 16 * h) as *const _);
            let x = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(wp.add(j + 16 * h)));
            acc[h] = _mm512_fmadd_ps(x, x, acc[h]);
            let k = _mm512_max_epi32(v, lo);
            vmax = _mm512_max_epi32(vmax, k);
            *out = _mm512_cvtsepi32_epi16(k);
        }
        let v16 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed[0]), packed[1]);
        _mm512_storeu_si512(op.add(j) as *mut _, v16);
        vneg = _mm512_or_si512(vneg, v16);
        vsum = _mm512_add_epi32(vsum, _mm512_madd_epi16(v16, ones));
        vsq = _mm512_add_epi32(vsq, _mm512_madd_epi16(v16, v16));
        if let Some(p) = u8p {
            _mm256_storeu_si256(p.add(j) as *mut __m256i, _mm512_cvtusepi16_epi8(v16));
        }
        j += 32;
    }
    let total = _mm512_add_ps(acc[0], acc[1]);
    let sp = sq.as_mut_ptr();
    _mm512_storeu_pd(sp, _mm512_add_pd(_mm512_loadu_pd(sp), _mm512_cvtps_pd(_mm512_castps512_ps256(total))));
    let upper = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(total)));
    _mm512_storeu_pd(sp.add(8), _mm512_add_pd(_mm512_loadu_pd(sp.add(8)), _mm512_cvtps_pd(upper)));
    let folds = Folds {
        sum: _mm512_reduce_add_epi32(vsum) as i64,
        sumsq: _mm512_reduce_add_epi32(vsq),
        max: _mm512_reduce_max_epi32(vmax).min(i16::MAX as i32) as i16,
        negative: _mm512_movepi16_mask(vneg) != 0,
    };
    if let Some(p) = u8p {
        for (t, &v) in c.iter().enumerate().skip(n) {
            *p.add(t) = v.clamp(0, u8::MAX as i32) as u8;
        }
    }
    prepare_tail(c, idf, n, sq, c16, folds)
}

/// [`prepare_i32_avx512`] on AVX2 (eight-lane chains, flushed to the same 16 f64 lanes).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn prepare_i32_avx2(c: &[i32], idf: &[f32], sq: &mut [f64; 16], c16: &mut [i16]) -> Folds {
    debug_assert!(c.len() == idf.len() && c.len() == c16.len() && c.len() <= 1 << 16);
    let n = c.len() / 32 * 32;
    let (cp, wp, op) = (c.as_ptr(), idf.as_ptr(), c16.as_mut_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let (lo, hi) = (_mm256_set1_epi32(-1), _mm256_set1_epi32(i16::MAX as i32));
    let (mut vmin, mut vmax, mut vsum, mut vsq) = (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
    let mut j = 0;
    while j < n {
        for h in 0..2 {
            let mut k = [_mm256_setzero_si256(); 2];
            for (p, kp) in k.iter_mut().enumerate() {
                let at = j + 16 * h + 8 * p;
                let v = _mm256_loadu_si256(cp.add(at) as *const __m256i);
                let x = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(wp.add(at)));
                acc[2 * h + p] = _mm256_fmadd_ps(x, x, acc[2 * h + p]);
                *kp = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
                vmin = _mm256_min_epi32(vmin, *kp);
                vmax = _mm256_max_epi32(vmax, *kp);
                vsum = _mm256_add_epi32(vsum, *kp);
            }
            // packs works within 128-bit halves: 0xD8 puts the four quarters back in order.
            let packed = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(k[0], k[1]));
            _mm256_storeu_si256(op.add(j + 16 * h) as *mut __m256i, packed);
            vsq = _mm256_add_epi32(vsq, _mm256_madd_epi16(packed, packed));
        }
        j += 32;
    }
    let pair = [_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3])];
    let sp = sq.as_mut_ptr();
    for (i, v) in pair.into_iter().enumerate() {
        for (q, half) in [_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)].into_iter().enumerate() {
            let at = sp.add(8 * i + 4 * q);
            _mm256_storeu_pd(at, _mm256_add_pd(_mm256_loadu_pd(at), _mm256_cvtps_pd(half)));
        }
    }
    let mut lanes = [[0i32; 8]; 4];
    for (out, v) in lanes.iter_mut().zip([vsum, vmin, vmax, vsq]) {
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v);
    }
    let folds = Folds {
        sum: lanes[0].iter().map(|&v| v as i64).sum(),
        sumsq: lanes[3].iter().fold(0i32, |a, &v| a.wrapping_add(v)),
        max: lanes[2].iter().fold(0, |m, &v| m.max(v)) as i16,
        negative: lanes[1].iter().any(|&v| v < 0),
    };
    prepare_tail(c, idf, n, sq, c16, folds)
}

/// The elements from `n` on (fewer than 32), scalar, continuing the folds (at most two
/// more roundings per lane: one square, one add).
#[inline]
fn prepare_tail(c: &[i32], idf: &[f32], n: usize, sq: &mut [f64; 16], c16: &mut [i16], mut f: Folds) -> Folds {
    for t in n..c.len() {
        let x = c[t] as f32 * idf[t];
        sq[(t - n) % 16] += (x * x) as f64;
        let k = c[t].clamp(-1, i16::MAX as i32) as i16;
        c16[t] = k;
        f.sum += k as i64;
        f.sumsq = f.sumsq.wrapping_add(k as i32 * k as i32);
        f.negative |= k < 0;
        f.max = f.max.max(k);
    }
    f
}
