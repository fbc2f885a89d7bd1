//! Estimate kernels with explicit intrinsics (chosen at run time by [`super::Isa::detect`]), so a
//! `-C target-cpu=native` build runs the same code as a generic one. Each (decoder, layer) dot of
//! int16 counts with int16/int8 weights (u8 counts with int8 weights on VNNI) accumulates in i32
//! lanes (no overflow: counts are kept under `Quantized::count_limit`), is converted to f32 and
//! scaled by an exact power of two. Each kernel takes `UNIT_T`: true only where every count
//! divisor t_i in `tmul` is 1 (the caller checks).
use super::quant::Dims;
use super::{Extremes, Folds};
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

/// Σ c16·(2^shift·Q8 + R) per decoder of `rows` into `est`: the residual level's weights built
/// in registers from the int8 table `q8` and the residual `r` (sign-extended, shifted, added:
/// 2^7·127 + 64 fits int16), `vpdpwssd` with the int16 counts. For the few rows a narrowing reads
/// where the u8 counts of the first pass were divided (long prompts); `d.epad` a multiple of 32.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn vnni_i16_of8<const UNIT_T: bool>(
    d: Dims,
    counts: &[i16],
    q8: &[i8],
    r: &[i8],
    shift: u32,
    scale: &[f32],
    tmul: &[f32],
    rows: &[usize],
    est: &mut [f32],
) {
    let (cp, qp, rp) = (counts.as_ptr(), q8.as_ptr(), r.as_ptr());
    let sh = _mm_cvtsi32_si128(shift as i32);
    for (&k, out) in rows.iter().zip(est.iter_mut()) {
        let mut acc = _mm512_setzero_ps();
        for i in 0..d.layers {
            let at = (k * d.layers + i) * d.epad;
            let mut dot = _mm512_setzero_si512();
            let mut e = 0;
            while e < d.epad {
                let a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(qp.add(at + e) as *const __m256i));
                let b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(rp.add(at + e) as *const __m256i));
                let w = _mm512_add_epi16(_mm512_sll_epi16(a, sh), b);
                dot = _mm512_dpwssd_epi32(dot, _mm512_loadu_si512(cp.add(i * d.epad + e) as *const _), w);
                e += 32;
            }
            let s = _mm512_set1_ps(scaled::<UNIT_T>(scale, k * d.layers + i, tmul, i));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc);
        }
        *out = _mm512_reduce_add_ps(acc);
    }
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
// the bytes of an int16 table; `d.epad` must be a multiple of 64.
vnni_kernel!(vnni_u8, u8, i8, load512_i8, 64, _mm512_dpbusd_epi32);
avx2_kernel!(avx2_i16, i16, load256_i16);
avx2_kernel!(avx2_i8, i8, load256_i8);

/// [`super::prepare_i32`] on AVX-512: [`prepare_i32_avx512`] per kept layer, inlined into one
/// loop (a call per layer, with its folds returned through memory, cost more than the pass),
/// the extremes kept in registers across layers and reduced once.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn prepare_layers_avx512(
    c: &[i32],
    kept: &[usize],
    (e, epad): (usize, usize),
    idf: &[f32],
    sq: &mut [f64; 16],
    c16: &mut [i16],
    c8: Option<&mut [u8]>,
    folds: &mut [Folds],
) -> Extremes {
    // Raw pointers and register accumulators: an opaque call in this loop (a closure over `c8`)
    // spilled them, and the f64 lanes of `sq` then chained through memory from layer to layer.
    let c8p = c8.map(|c8| c8.as_mut_ptr());
    let (mut vmax, mut vneg) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let sp = sq.as_mut_ptr();
    let mut acc = [_mm512_loadu_pd(sp), _mm512_loadu_pd(sp.add(8))];
    let mut tails = Extremes::default();
    for (i, (&l, f)) in kept.iter().zip(folds.iter_mut()).enumerate() {
        let c8 = c8p.map(|p| p.add(i * epad));
        let (cl, il, ol) = (c.as_ptr().add(l * e), idf.as_ptr().add(i * e), c16.as_mut_ptr().add(i * epad));
        let t;
        (*f, t) = prepare_i32_avx512(e, cl, il, &mut acc, ol, c8, &mut vmax, &mut vneg);
        tails = tails.merge(t);
    }
    _mm512_storeu_pd(sp, acc[0]);
    _mm512_storeu_pd(sp.add(8), acc[1]);
    let mut lanes = [0i16; 32];
    _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, vmax);
    let max = lanes.iter().fold(0i16, |m, &v| m.max(v));
    Extremes { max, negative: _mm512_movepi16_mask(vneg) != 0 }.merge(tails)
}

/// [`prepare_layers_avx512`] on AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn prepare_layers_avx2(c: &[i32], kept: &[usize], (e, epad): (usize, usize), idf: &[f32], sq: &mut [f64; 16], c16: &mut [i16], folds: &mut [Folds]) -> Extremes {
    let mut ext = Extremes::default();
    for (i, (&l, f)) in kept.iter().zip(folds.iter_mut()).enumerate() {
        let x;
        (*f, x) = prepare_i32_avx2(&c[l * e..][..e], &idf[i * e..][..e], sq, &mut c16[i * epad..][..e]);
        ext = ext.merge(x);
    }
    ext
}

/// The counts pass for one layer's `len` i32 counts at `cp` (IDF at `wp`): adds an f32 estimate
/// of Σ (c·idf)² to the 16 f64 lanes `sq` (f32 products and sums within the call, two chains,
/// flushed to `sq` at its end; each lane's f32 part takes at most ⌈len/32⌉ + 1 roundings,
/// `super::norm_rho` bounds the relative error), writes min(c, i16::MAX) to `op` (and min(c, 255)
/// to `u8p` if given; a negative count, which the caller refuses, leaves both unspecified) and
/// returns the folds of what it wrote to `op`, with the max and sign bits of its first
/// ⌊len/32⌋·32 packed counts folded into `vmax` and `vneg` (the tail's extremes returned). Per 32
/// counts: one saturating pack to int16 (`vpmovsdw`: a negative count stays negative), then Σ and
/// Σ c² of the packed pairs (`vpdpwssd` with ones and with itself), and the u8 counts from the
/// packed ones (`vpmovuswb`). Needs `len ≤ 65 536` (the i32 sum).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn prepare_i32_avx512(
    len: usize,
    cp: *const i32,
    wp: *const f32,
    sq: &mut [__m512d; 2],
    op: *mut i16,
    u8p: Option<*mut u8>,
    vmax: &mut __m512i,
    vneg: &mut __m512i,
) -> (Folds, Extremes) {
    debug_assert!(len <= 1 << 16);
    let n = len / 32 * 32;
    let mut acc = [_mm512_setzero_ps(); 2];
    let ones = _mm512_set1_epi16(1);
    let (mut vsum, mut vsq) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut j = 0;
    while j < n {
        let mut packed = [_mm256_setzero_si256(); 2];
        for (h, out) in packed.iter_mut().enumerate() {
            let v = _mm512_loadu_si512(cp.add(j + 16 * h) as *const _);
            let x = _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_loadu_ps(wp.add(j + 16 * h)));
            acc[h] = _mm512_fmadd_ps(x, x, acc[h]);
            *out = _mm512_cvtsepi32_epi16(v);
        }
        let v16 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed[0]), packed[1]);
        _mm512_storeu_si512(op.add(j) as *mut _, v16);
        *vneg = _mm512_or_si512(*vneg, v16);
        *vmax = _mm512_max_epi16(*vmax, v16);
        vsum = _mm512_dpwssd_epi32(vsum, v16, ones);
        vsq = _mm512_dpwssd_epi32(vsq, v16, v16);
        if let Some(p) = u8p {
            _mm256_storeu_si256(p.add(j) as *mut __m256i, _mm512_cvtusepi16_epi8(v16));
        }
        j += 32;
    }
    let total = _mm512_add_ps(acc[0], acc[1]);
    sq[0] = _mm512_add_pd(sq[0], _mm512_cvtps_pd(_mm512_castps512_ps256(total)));
    sq[1] = _mm512_add_pd(sq[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(total)))));
    let (sum, sumsq) = reduce_pair(vsum, vsq);
    let c = std::slice::from_raw_parts(cp, len);
    if let Some(p) = u8p {
        for (t, &v) in c.iter().enumerate().skip(n) {
            *p.add(t) = v.clamp(0, u8::MAX as i32) as u8;
        }
    }
    if n == len {
        return (Folds { sum: sum as i64, sumsq }, Extremes::default());
    }
    let mut lanes = [0.0f64; 16];
    let tail = prepare_tail(c, std::slice::from_raw_parts(wp, len), n, &mut lanes, std::slice::from_raw_parts_mut(op, len), (Folds { sum: sum as i64, sumsq }, Extremes::default()));
    sq[0] = _mm512_add_pd(sq[0], _mm512_loadu_pd(lanes.as_ptr()));
    sq[1] = _mm512_add_pd(sq[1], _mm512_loadu_pd(lanes.as_ptr().add(8)));
    tail
}

/// The lane sums of `a` and of `b` (wrapping), reduced together: half the shuffles of two
/// separate reductions.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn reduce_pair(a: __m512i, b: __m512i) -> (i32, i32) {
    let a8 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a));
    let b8 = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64::<1>(b));
    // 128-bit blocks: a, a, b, b; each block summed within itself, then block 1 into 0, 3 into 2.
    let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a8), b8);
    let v = _mm512_add_epi32(v, _mm512_shuffle_epi32::<0x4E>(v));
    let v = _mm512_add_epi32(v, _mm512_shuffle_epi32::<0xB1>(v));
    let v = _mm512_add_epi32(v, _mm512_shuffle_i32x4::<0x31>(v, v));
    (_mm_cvtsi128_si32(_mm512_castsi512_si128(v)), _mm_cvtsi128_si32(_mm512_extracti32x4_epi32::<2>(v)))
}

/// [`prepare_i32_avx512`] on AVX2 (eight-lane chains, flushed to the same 16 f64 lanes; the
/// extremes returned per layer, negative counts written as −1).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn prepare_i32_avx2(c: &[i32], idf: &[f32], sq: &mut [f64; 16], c16: &mut [i16]) -> (Folds, Extremes) {
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
    let folds = Folds { sum: lanes[0].iter().map(|&v| v as i64).sum(), sumsq: lanes[3].iter().fold(0i32, |a, &v| a.wrapping_add(v)) };
    let ext = Extremes { max: lanes[2].iter().fold(0, |m, &v| m.max(v)) as i16, negative: lanes[1].iter().any(|&v| v < 0) };
    prepare_tail(c, idf, n, sq, c16, (folds, ext))
}

/// The elements from `n` on (fewer than 32), scalar, continuing the folds (at most two
/// more roundings per lane: one square, one add).
#[inline]
fn prepare_tail(c: &[i32], idf: &[f32], n: usize, sq: &mut [f64; 16], c16: &mut [i16], (mut f, mut x): (Folds, Extremes)) -> (Folds, Extremes) {
    for t in n..c.len() {
        let v = c[t] as f32 * idf[t];
        sq[(t - n) % 16] += (v * v) as f64;
        let k = c[t].clamp(-1, i16::MAX as i32) as i16;
        c16[t] = k;
        f.sum += k as i64;
        f.sumsq = f.sumsq.wrapping_add(k as i32 * k as i32);
        x.negative |= k < 0;
        x.max = x.max.max(k);
    }
    (f, x)
}
