//! The exact score: f64 arithmetic with 32 lane accumulators (lane = index mod 32) reduced by a
//! fixed pairwise tree. IEEE operations in a fixed order without contraction, so generic,
//! AVX2, AVX-512 and native-flags builds compute identical bits.
use multiversion::multiversion;

/// Lane accumulators of the rule's sums (lane = index mod LANES).
pub const LANES: usize = 32;

/// The fixed pairwise reduction of the lanes.
#[inline]
pub fn reduce(mut acc: [f64; LANES]) -> f64 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            acc[i] += acc[i + n];
        }
    }
    acc[0]
}

/// Σ x_j · row_j.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn dot(x: &[f64], row: &[f32]) -> f64 {
    debug_assert_eq!(x.len(), row.len());
    let mut acc = [0.0f64; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut rs = row.chunks_exact(LANES);
    for (a, b) in (&mut xs).zip(&mut rs) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i] as f64;
        }
    }
    for (i, (a, b)) in xs.remainder().iter().zip(rs.remainder()).enumerate() {
        acc[i] += a * *b as f64;
    }
    reduce(acc)
}

/// Σ x_j².
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
pub fn sum_squares(x: &[f64]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut xs = x.chunks_exact(LANES);
    for a in &mut xs {
        for i in 0..LANES {
            acc[i] += a[i] * a[i];
        }
    }
    for (i, a) in xs.remainder().iter().enumerate() {
        acc[i] += a * a;
    }
    reduce(acc)
}

/// A bound on |computed − real| of `dot(x, row) / sqrt(sum_squares(x))` for a unit `row` of
/// dimension `dim` (relative rounding ≤ (dim/32 + 16)·2⁻⁵², doubled for margin).
pub fn rule_error(dim: usize) -> f64 {
    1e-12 + (dim as f64 / 32.0 + 16.0) * f64::EPSILON * 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_long_double_style_sum() {
        let x: Vec<f64> = (0..1000).map(|i| (i % 17) as f64 * 0.37).collect();
        let r: Vec<f32> = (0..1000).map(|i| ((i * 31) % 23) as f32 / 23.0 - 0.5).collect();
        let naive: f64 = x.iter().zip(&r).map(|(a, b)| a * *b as f64).sum();
        assert!((dot(&x, &r) - naive).abs() < 1e-9);
        assert!((sum_squares(&x) - x.iter().map(|v| v * v).sum::<f64>()).abs() < 1e-9);
    }
}
