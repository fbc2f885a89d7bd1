//! Unit centroids in a block-transposed layout so that scoring one signature against all
//! workers is a streaming, vectorisable pass with a fixed, target-independent summation order.
use crate::error::{Result, RouterError};
use crate::signature::check_finite;
use multiversion::multiversion;

/// Workers per block: one AVX-512 register (two AVX2 registers) of f32 accumulators.
const BW: usize = 16;
/// Independent accumulators over the signature dimension, to hide add latency.
const LANES: usize = 4;

#[derive(Debug, Clone)]
pub struct Centroids {
    workers: usize,
    dim: usize,
    /// `[blocks][dim][BW]`, zero-padded in the last block.
    blocked: Vec<f32>,
    /// The unit rows, `[workers, dim]`, kept for callers that read the model back.
    rows: Vec<f32>,
}

impl Centroids {
    /// `data` is `[workers, dim]` row-major; every row is normalised to unit length.
    pub fn new(data: &[f32], workers: usize, dim: usize) -> Result<Self> {
        if workers == 0 {
            return Err(RouterError::NoWorkers);
        }
        if dim == 0 || data.len() != workers * dim {
            return Err(RouterError::Shape {
                arg: "centroids",
                expected: format!("[{workers}, {dim}] with dim > 0"),
                got: format!("{} elements", data.len()),
            });
        }
        check_finite("centroids", data)?;
        let mut rows = Vec::with_capacity(data.len());
        for (w, row) in data.chunks_exact(dim).enumerate() {
            let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
            if norm == 0.0 {
                return Err(RouterError::Invalid { arg: "centroids", reason: format!("row {w} is all zeros") });
            }
            rows.extend(row.iter().map(|&v| ((v as f64) / norm) as f32));
        }
        let blocks = workers.div_ceil(BW);
        let mut blocked = vec![0.0f32; blocks * dim * BW];
        for w in 0..workers {
            let (b, lane) = (w / BW, w % BW);
            for j in 0..dim {
                blocked[(b * dim + j) * BW + lane] = rows[w * dim + j];
            }
        }
        Ok(Self { workers, dim, blocked, rows })
    }

    pub fn workers(&self) -> usize {
        self.workers
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn rows(&self) -> &[f32] {
        &self.rows
    }

    /// Cosine of `x` (any non-zero norm) to every centroid, written to `out[..workers]`.
    /// Returns `false` and writes zeros when `x` is the zero vector.
    pub fn cosines(&self, x: &[f32], out: &mut Vec<f32>) -> bool {
        debug_assert_eq!(x.len(), self.dim);
        out.clear();
        let norm = sum_squares(x).sqrt();
        if norm == 0.0 {
            out.resize(self.workers, 0.0);
            return false;
        }
        let inv = (1.0 / norm) as f32;
        let mut block_out = [0.0f32; BW];
        for block in self.blocked.chunks_exact(self.dim * BW) {
            dot_block(x, block, &mut block_out);
            let take = (self.workers - out.len()).min(BW);
            out.extend(block_out[..take].iter().map(|d| d * inv));
        }
        true
    }
}

// AVX-512 is left out on purpose: on the AMD EPYC hosts we run on, the AVX-512 build of this
// loop measured 30× slower than AVX2 (bench/RESULTS.md).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn dot_block(x: &[f32], block: &[f32], out: &mut [f32; BW]) {
    let mut acc = [[0.0f32; BW]; LANES];
    let mut xs = x.chunks_exact(LANES);
    let mut rows = block.chunks_exact(LANES * BW);
    for (xc, rc) in (&mut xs).zip(&mut rows) {
        for u in 0..LANES {
            let xj = xc[u];
            let row = &rc[u * BW..(u + 1) * BW];
            for i in 0..BW {
                acc[u][i] += xj * row[i];
            }
        }
    }
    let tail_rows = &block[(x.len() / LANES) * LANES * BW..];
    for (u, &xj) in xs.remainder().iter().enumerate() {
        let row = &tail_rows[u * BW..(u + 1) * BW];
        for i in 0..BW {
            acc[u][i] += xj * row[i];
        }
    }
    for i in 0..BW {
        out[i] = (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i]);
    }
}

// AVX-512 is left out on purpose: on the AMD EPYC hosts we run on, the AVX-512 build of this
// loop measured 30× slower than AVX2 (bench/RESULTS.md).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0.0f32; BW];
    let mut chunks = x.chunks_exact(BW);
    for c in &mut chunks {
        for i in 0..BW {
            acc[i] += c[i] * c[i];
        }
    }
    let mut total: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    for a in acc {
        total += a as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosines_match_naive() {
        let (w, d) = (19, 37);
        let data: Vec<f32> = (0..w * d).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let c = Centroids::new(&data, w, d).unwrap();
        let x: Vec<f32> = (0..d).map(|i| ((i * 31) % 13) as f32).collect();
        let mut out = Vec::new();
        assert!(c.cosines(&x, &mut out));
        let xn = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        for k in 0..w {
            let row = &data[k * d..(k + 1) * d];
            let rn = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let dot: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            assert!((out[k] - dot / (rn * xn)).abs() < 1e-5, "worker {k}");
        }
    }

    #[test]
    fn zero_vector_is_reported() {
        let c = Centroids::new(&[1.0, 0.0, 0.0, 1.0], 2, 2).unwrap();
        let mut out = Vec::new();
        assert!(!c.cosines(&[0.0, 0.0], &mut out));
        assert_eq!(out, vec![0.0, 0.0]);
    }

    #[test]
    fn zero_row_is_rejected() {
        let err = Centroids::new(&[1.0, 0.0, 0.0, 0.0], 2, 2).unwrap_err();
        assert!(err.to_string().contains("row 1"));
    }
}
