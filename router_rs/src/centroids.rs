//! Unit centroids, one row per decoder in member order.
use crate::error::{Result, RouterError};
use crate::signature::check_finite;

#[derive(Debug, Clone)]
pub struct Centroids {
    workers: usize,
    dim: usize,
    /// `[workers, dim]`, each row of unit length.
    rows: Vec<f32>,
}

fn unit(row: &[f32], index: usize) -> Result<impl Iterator<Item = f32> + '_> {
    let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
    if norm == 0.0 {
        return Err(RouterError::Invalid { arg: "centroids", reason: format!("row {index} is all zeros") });
    }
    Ok(row.iter().map(move |&v| ((v as f64) / norm) as f32))
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
            rows.extend(unit(row, w)?);
        }
        Ok(Self { workers, dim, rows })
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
    pub fn row(&self, k: usize) -> &[f32] {
        &self.rows[k * self.dim..(k + 1) * self.dim]
    }

    /// These rows (unchanged) with `row` (normalised) appended.
    pub fn with_row(&self, row: &[f32]) -> Result<Self> {
        if row.len() != self.dim {
            return Err(RouterError::Shape { arg: "centroid", expected: format!("[{}]", self.dim), got: format!("[{}]", row.len()) });
        }
        check_finite("centroid", row)?;
        let mut rows = self.rows.clone();
        rows.extend(unit(row, self.workers)?);
        Ok(Self { workers: self.workers + 1, dim: self.dim, rows })
    }

    /// These rows without row `k`.
    pub fn without(&self, k: usize) -> Self {
        let mut rows = self.rows.clone();
        rows.drain(k * self.dim..(k + 1) * self.dim);
        Self { workers: self.workers - 1, dim: self.dim, rows }
    }

    /// The normalised mean direction of the rows (the first row when they cancel out).
    pub fn mean_direction(&self) -> Vec<f32> {
        let mut mean = vec![0.0f64; self.dim];
        for row in self.rows.chunks_exact(self.dim) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm < 1e-12 {
            return self.row(0).to_vec();
        }
        mean.iter().map(|v| (v / norm) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_unit_and_zero_rows_are_refused() {
        let c = Centroids::new(&[3.0, 4.0, 0.0, 2.0], 2, 2).unwrap();
        assert_eq!(c.rows(), &[0.6, 0.8, 0.0, 1.0]);
        let err = Centroids::new(&[1.0, 0.0, 0.0, 0.0], 2, 2).unwrap_err();
        assert!(err.to_string().contains("row 1"));
    }

    #[test]
    fn membership_edits_keep_the_other_rows_bit_for_bit() {
        let c = Centroids::new(&[3.0, 4.0, 0.0, 2.0], 2, 2).unwrap();
        let grown = c.with_row(&[1.0, 1.0]).unwrap();
        assert_eq!(&grown.rows()[..4], c.rows());
        assert_eq!(grown.without(2).rows(), c.rows());
        assert_eq!(grown.without(0).row(0), c.row(1));
        let m = c.mean_direction();
        assert!((m[0] * m[0] + m[1] * m[1] - 1.0).abs() < 1e-6);
    }
}
