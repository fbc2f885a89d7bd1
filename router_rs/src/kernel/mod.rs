//! Scoring kernels. [`exact`] is the rule itself (f64, a fixed summation order, the same bits on
//! every build); [`quant`] gives fixed-point estimates of it with a certified error bound, so a
//! decision needs the exact score only of the few decoders near a boundary.
pub mod exact;
pub mod quant;
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
