//! Run-time CPU feature dispatch for the hand-written f32 loops.
//!
//! The crate is built for the baseline x86-64 target (so the binary runs anywhere), where
//! LLVM only vectorises to SSE2. `dispatch!` compiles a loop again with AVX-512 and with
//! AVX2+FMA enabled and picks the best copy the CPU can run.

/// `dispatch!(pub fn name(args); via generic)` defines `name`, which calls `generic` (an
/// `#[inline(always)]` function with the same arguments) compiled with AVX-512F when the CPU
/// has it, else with AVX2+FMA when it has them, else the baseline copy.
/// `dispatch!(unsafe fn ...)` does the same for an `unsafe` generic (one that writes through
/// raw pointers, say), and `name` is `unsafe` with the generic's contract.
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?; via $generic:path) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: `generic` is safe; only the feature checks guard the copies.
            #[allow(unused_unsafe)]
            unsafe {
                $crate::kernels::cpu::simd::dispatch!(@pick $generic; $($arg : $ty),*; $($ret)?)
            }
        }
    };
    ($vis:vis unsafe fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?; via $generic:path) => {
        /// # Safety
        /// The contract of the generic this dispatches to.
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: the caller upholds the generic's contract; the feature checks guard the
            // copies.
            #[allow(unused_unsafe)]
            unsafe {
                $crate::kernels::cpu::simd::dispatch!(@pick $generic; $($arg : $ty),*; $($ret)?)
            }
        }
    };
    // The body: the copies, and the pick. Expands inside an `unsafe` block.
    (@pick $generic:path; $($arg:ident : $ty:ty),*; $($ret:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments, unused_unsafe)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                unsafe { $generic($($arg),*) }
            }
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments, unused_unsafe)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                unsafe { $generic($($arg),*) }
            }
            let avx2_fma = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2_fma && std::arch::is_x86_feature_detected!("avx512f") {
                return avx512($($arg),*);
            }
            if avx2_fma {
                return avx2($($arg),*);
            }
        }
        $generic($($arg),*)
    }};
}
pub(crate) use dispatch;

/// Sum with 16 independent lanes (so the loop vectorises without reassociating floats).
#[inline(always)]
pub fn sum16(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    let mut s: f32 = chunks.remainder().iter().sum();
    for a in acc {
        s += a;
    }
    s
}

/// Dot product with 16 independent lanes.
#[inline(always)]
pub fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for v in acc {
        s += v;
    }
    s
}

/// Max with 16 independent lanes.
#[inline(always)]
pub fn max16(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        m = m.max(v);
    }
    m
}

/// x86 helpers shared by the AVX-512 kernels.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    /// The mask of the first `min(n, 16)` lanes (none for 0): a vector's share of the `n`
    /// values left from where it starts.
    #[inline(always)]
    pub fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// Transpose 16 x 16 values in four butterfly steps: step `b` (8, 4, 2, 1) swaps the
    /// off-diagonal `b x b` squares of every `2b x 2b` one.
    ///
    /// # Safety
    /// AVX-512F (callers inline it into their own AVX-512 code).
    #[inline(always)]
    pub unsafe fn transpose16(r: &mut [__m512; 16]) {
        for b in [8usize, 4, 2, 1] {
            let mut lo = [0i32; 16];
            let mut hi = [0i32; 16];
            for l in 0..16 {
                // Row i (bit b clear) keeps its lanes without bit b and takes row i + b's
                // lanes l - b; row i + b takes row i's lanes l + b and keeps its own.
                (lo[l], hi[l]) = if l & b == 0 {
                    (l as i32, (l + b) as i32)
                } else {
                    ((16 + l - b) as i32, (16 + l) as i32)
                };
            }
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_si512(lo.as_ptr() as *const _),
                    _mm512_loadu_si512(hi.as_ptr() as *const _),
                )
            };
            for i in (0..16).filter(|i| i & b == 0) {
                let (x, y) = (r[i], r[i + b]);
                r[i] = _mm512_permutex2var_ps(x, lo, y);
                r[i + b] = _mm512_permutex2var_ps(x, hi, y);
            }
        }
    }
}
