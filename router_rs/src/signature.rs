//! Request signature geometry: counts `[L,E]` × IDF → kept layers → flat vector (the L2 norm is
//! applied where scores are computed, `model.rs`).
use crate::error::{Result, RouterError};
use multiversion::multiversion;

/// An integer count element accepted from callers (any numpy integer dtype).
pub trait CountValue: Copy + Send + Sync {
    fn is_negative(self) -> bool;
    fn as_f64(self) -> f64;
    /// The value of a count already checked non-negative.
    fn as_u64(self) -> u64;
    /// min(value, i16::MAX), or −1 for a negative value, in the type's own arithmetic (so it
    /// vectorises).
    fn clamp_i16(self) -> i16;
    /// The slice itself when the type is i32 (what the engine sends), for the explicit-SIMD
    /// counts pass.
    fn as_i32s(_: &[Self]) -> Option<&[i32]>
    where
        Self: Sized,
    {
        None
    }
}

macro_rules! signed_count {
    ($($t:ty),*) => {$( signed_count!(@one $t;); )*};
    (@one $t:ty; $($extra:item)*) => {
        impl CountValue for $t {
            #[inline] fn is_negative(self) -> bool { self < 0 }
            #[inline] fn as_f64(self) -> f64 { self as f64 }
            #[inline] fn as_u64(self) -> u64 { self as u64 }
            #[inline] fn clamp_i16(self) -> i16 { (self as i64).clamp(-1, i16::MAX as i64) as i16 }
            $($extra)*
        }
    };
}
macro_rules! unsigned_count {
    ($($t:ty),*) => {$(
        impl CountValue for $t {
            #[inline] fn is_negative(self) -> bool { false }
            #[inline] fn as_f64(self) -> f64 { self as f64 }
            #[inline] fn as_u64(self) -> u64 { self as u64 }
            #[inline] fn clamp_i16(self) -> i16 { if (self as u64) > i16::MAX as u64 { i16::MAX } else { self as i16 } }
        }
    )*};
}
signed_count!(i8, i16, i64);
unsigned_count!(u8, u16, u32, u64);

signed_count!(@one i32; #[inline] fn as_i32s(s: &[Self]) -> Option<&[i32]> { Some(s) });

/// Model geometry plus the calibration transforms that turn counts into a signature.
#[derive(Debug, Clone)]
pub struct SignatureSpec {
    layers: usize,
    experts: usize,
    /// `[L*E]`, row-major.
    idf: Vec<f32>,
    /// Indices of kept layers, ascending.
    kept: Vec<usize>,
}

impl SignatureSpec {
    /// `idf`: `[layers*experts]` or `None` for all-ones; `mask`: `[layers]` or `None` for all layers.
    pub fn new(layers: usize, experts: usize, idf: Option<&[f32]>, mask: Option<&[bool]>) -> Result<Self> {
        if layers == 0 || experts == 0 {
            return Err(RouterError::Invalid {
                arg: "idf",
                reason: format!("geometry must have layers > 0 and experts > 0, got [{layers}, {experts}]"),
            });
        }
        let idf = match idf {
            Some(w) => {
                if w.len() != layers * experts {
                    return Err(RouterError::Shape {
                        arg: "idf",
                        expected: format!("[{layers}, {experts}]"),
                        got: format!("{} elements", w.len()),
                    });
                }
                check_finite_nonneg("idf", w)?;
                w.to_vec()
            }
            None => vec![1.0; layers * experts],
        };
        let kept: Vec<usize> = match mask {
            Some(m) => {
                if m.len() != layers {
                    return Err(RouterError::Shape {
                        arg: "layer_mask",
                        expected: format!("[{layers}]"),
                        got: format!("[{}]", m.len()),
                    });
                }
                (0..layers).filter(|&l| m[l]).collect()
            }
            None => (0..layers).collect(),
        };
        if kept.is_empty() {
            return Err(RouterError::Invalid { arg: "layer_mask", reason: "keeps no layer".into() });
        }
        Ok(Self { layers, experts, idf, kept })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }
    pub fn experts(&self) -> usize {
        self.experts
    }
    /// Signature dimension: kept layers × experts.
    pub fn dim(&self) -> usize {
        self.kept.len() * self.experts
    }

    /// Kept layer indices, ascending.
    pub fn kept(&self) -> &[usize] {
        &self.kept
    }
    /// IDF weights of layer `l`, `[experts]`.
    pub fn idf_row(&self, l: usize) -> &[f32] {
        &self.idf[l * self.experts..(l + 1) * self.experts]
    }

    /// Refuses counts of another shape, or with a negative entry.
    pub fn check<T: CountValue>(&self, counts: &[T], rows: usize, cols: usize) -> Result<()> {
        self.check_shape(counts, rows, cols)?;
        self.check_sign(counts, any_negative(counts))
    }

    /// Refuses counts of another shape.
    pub fn check_shape<T: CountValue>(&self, counts: &[T], rows: usize, cols: usize) -> Result<()> {
        if rows != self.layers || cols != self.experts || counts.len() != rows * cols {
            return Err(RouterError::Shape {
                arg: "counts",
                expected: format!("[{}, {}]", self.layers, self.experts),
                got: format!("[{rows}, {cols}]"),
            });
        }
        Ok(())
    }

    /// Whether a layer the mask drops has a negative count (kept layers are checked by whoever
    /// reads them, see [`check_sign`](Self::check_sign)).
    pub(crate) fn dropped_negative<T: CountValue>(&self, counts: &[T]) -> bool {
        if self.kept.len() == self.layers {
            return false; // nothing dropped (the usual mask), without a walk over the layers
        }
        let e = self.experts;
        let mut next = 0;
        let mut any = false;
        for &l in self.kept.iter().chain(std::iter::once(&self.layers)) {
            if l > next {
                any |= any_negative(&counts[next * e..l * e]);
            }
            next = l + 1;
        }
        any
    }

    /// The error for counts found to hold a negative entry (`negative`), naming the first.
    pub(crate) fn check_sign<T: CountValue>(&self, counts: &[T], negative: bool) -> Result<()> {
        if negative {
            let index = counts.iter().position(|c| c.is_negative()).expect("a negative count");
            return Err(RouterError::Negative { arg: "counts", index, value: counts[index].as_f64() });
        }
        Ok(())
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx512dq", "x86_64+avx2+fma"))]
fn any_negative<T: CountValue>(counts: &[T]) -> bool {
    counts.iter().fold(false, |any, c| any | c.is_negative())
}

pub(crate) fn check_finite(arg: &'static str, v: &[f32]) -> Result<()> {
    if let Some(index) = v.iter().position(|x| !x.is_finite()) {
        return Err(RouterError::NonFinite { arg, index });
    }
    Ok(())
}

pub(crate) fn check_finite_nonneg(arg: &'static str, v: &[f32]) -> Result<()> {
    check_finite(arg, v)?;
    if let Some(index) = v.iter().position(|x| *x < 0.0) {
        return Err(RouterError::Negative { arg, index, value: v[index] as f64 });
    }
    Ok(())
}
