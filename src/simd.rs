//! The CPU's widest vector instructions for the host's element-wise loops, chosen at run
//! time.
//!
//! The binary targets baseline x86-64, so a loop the compiler vectorises runs on SSE2's
//! four lanes even where the CPU has AVX-512's sixteen (the matrix products are not
//! affected: the `gemm` crate dispatches by itself). `multiversion!` compiles a loop
//! three times, for AVX-512, AVX2 and the baseline, and runs the widest [`level`] allows.
//! Every version performs the same IEEE operations on each element in the same order (Rust
//! never fuses a multiply and an add on its own, and the loops' sums run in fixed lanes),
//! so every level gives the same bits (tested), and the binary still runs on any x86-64.
//!
//! The level is the CPU's, or lower where `MEP_SIMD` (`baseline`, `avx2`, `avx512`) or
//! [`set_level`] asks for it: to compare the levels side by side, or to rule them out.

use std::sync::atomic::{AtomicU8, Ordering};

/// A width of vector instructions, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// What every x86-64 CPU has (SSE2), and every other architecture's default.
    Baseline,
    /// AVX2 with FMA (256-bit vectors).
    Avx2,
    /// AVX-512 (512-bit vectors).
    Avx512,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

    /// Its name, as `MEP_SIMD` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The level `name` spells (`baseline`, `avx2`, `avx512`).
    pub fn parse(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest level this CPU has.
pub fn supported() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

const UNSET: u8 = u8::MAX;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);

fn from_u8(v: u8) -> Level {
    Level::ALL[usize::from(v).min(2)]
}

/// The level the element-wise loops run at: the CPU's, lowered by `MEP_SIMD` when that
/// names a level (an unknown name is ignored here; the CLI refuses it,
/// [`level_from_env`]), or what [`set_level`] last set.
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        UNSET => {
            let cpu = supported();
            let level = match level_from_env() {
                Ok(Some(asked)) => asked.min(cpu),
                _ => cpu,
            };
            LEVEL.store(level as u8, Ordering::Relaxed);
            level
        }
        v => from_u8(v),
    }
}

/// Sets the level of the element-wise loops, at most the CPU's (for every thread); returns
/// the level now in force.
pub fn set_level(level: Level) -> Level {
    let level = level.min(supported());
    LEVEL.store(level as u8, Ordering::Relaxed);
    level
}

/// The level `MEP_SIMD` asks for: `None` when it is unset or empty, an error naming the
/// accepted values when it names none.
pub fn level_from_env() -> Result<Option<Level>, String> {
    match std::env::var("MEP_SIMD") {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Level::parse(v.trim())
            .map(Some)
            .ok_or_else(|| format!("MEP_SIMD={v} names no level: use baseline, avx2 or avx512")),
        Err(_) => Ok(None),
    }
}

/// Defines a function whose body is compiled for each [`Level`] and run at [`level`]'s.
/// The body is plain element-wise code, no intrinsics: the versions differ only in how
/// wide the compiler vectorises it (calls it makes that are not inlined run at the
/// baseline).
macro_rules! multiversion {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: `level` never exceeds what the CPU reported.
                    $crate::simd::Level::Avx512 => unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::simd::Level::Baseline => body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                body($($arg),*)
            }
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `out = a - b`, element by element (equal lengths; `out` may be shorter).
    pub fn sub(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x - y;
        }
    }
}

multiversion! {
    /// `out = a + b`, element by element (`out` may be shorter).
    pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

multiversion! {
    /// `out += x`, element by element (`out` may be shorter).
    pub fn add_assign(out: &mut [f32], x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name_and_never_exceed_the_cpu() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert_eq!(Level::parse("sse9"), None);
        assert!(level() <= supported());
    }
}
