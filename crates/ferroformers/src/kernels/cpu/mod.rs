//! CPU kernels over plain f32 buffers (and GGUF's quantized blocks), for the models' CPU paths.
//!
//! - `simd`: `dispatch!`, which compiles a loop again for AVX-512 and AVX2+FMA and picks the
//!   best copy at run time, and 16-lane sum/dot/max;
//! - [`linear`]: `x @ W^T` (the streaming few-rows kernel, else the `gemm` crate), and the
//!   bias + residual products of the encoder stack;
//! - [`quantized`]: products and embedding lookups over GGUF blocks with f32 activations;
//! - [`vnni`]: AVX-512 VNNI integer dots over raw 32-value GGUF blocks (the int8 mode's
//!   decoding kernels where the CPU has them; [`blocks::dot_int_blocks`] picks them);
//! - [`packed`]: the same 32-value blocks rearranged per row into planes (scales, fifth bits,
//!   values) at load for the int8 mode, and the VNNI decoding kernels that read them;
//! - [`qgemm`]: the int8 mode's prompt products: a tile of GGUF weight rows unpacked into a
//!   VNNI panel once, every prompt row multiplied by it (exact integer sums per scale group);
//! - [`int8`]: dynamic int8 linear layers (`--quantize int8`): per-column 8-bit weights,
//!   8-bit activations per token and 128-input block, exact i32 sums (AVX-512 VNNI or the
//!   portable loop);
//! - [`bf16`]: bf16 linear layers (`--dtype bf16` on CPU), AVX512-BF16 `vdpbf16ps` kernels;
//! - `panels`: the blocking int8 and bf16 share (panels of 32 columns, 6-row microkernels,
//!   jobs, the fused epilogue);
//! - [`attention`]: softmax attention over whole sequences, one query row over a key/value
//!   buffer ([`attention::KvBuffer`]), a few query rows with grouped-query heads, and RMSNorm;
//! - [`screen`]: greedy decoding's output projection estimated in int8, the candidates for the
//!   largest logit computed again in f32 (argmax-exact logits for a quarter of the bytes);
//! - [`split8`]: a GGUF Q8_0 output matrix in two 4-bit planes: greedy steps estimate every
//!   logit from the high nibbles with rigorous bounds and finish only the candidates;
//! - [`rowops`]: row loops (LayerNorm, activations, masked softmax, gated products) and the
//!   vectorisable `exp`/`erf` behind them;
//! - [`threads`]: worker mode (products stay on the calling thread when the pipeline already
//!   runs one batch per core) and the pointer parallel jobs write through.
//!
//! Left with the models, in `models/layers.rs`: `serial_matmul` (reads a candle tensor's CPU
//! storage and calls [`linear::gemm_into`]), the `GeluErf` custom op (candle op plumbing around
//! [`rowops::fast_erf`]) and `sdpa`'s choice of the few-queries loop (tensor checks and copies
//! around [`attention::attend_few_queries`]): the candle `Tensor` side stays with the models,
//! the loops live here.

pub mod attention;
pub mod bf16;
pub mod blocks;
pub mod int8;
pub mod linear;
pub mod packed;
pub(crate) mod panels;
pub mod qgemm;
pub mod quantized;
pub mod rowops;
pub mod screen;
pub(crate) mod simd;
pub mod split8;
pub mod threads;
pub mod vnni;

/// Whether the environment switch `name` is on: `name=1` (any other value leaves it off).
/// The kernels' off switches (`FERROFORMERS_NO_SIMD`, `_NO_VNNI`, `_NO_BF16`) read it once
/// per process.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn switch_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// Whether the CPU is Intel's (CPUID vendor "GenuineIntel"), read once. Its cores run 512-bit
/// vector work on two ports only, so which kernel is fastest differs from AMD's Zen, which
/// has four: see [`quantized::QuantLinear::batch_invariance_costs_nothing`].
pub fn intel_cores() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *INTEL.get_or_init(|| {
            // CPUID leaf 0: the vendor string in EBX, EDX, ECX.
            let r = std::arch::x86_64::__cpuid(0);
            let vendor: Vec<u8> = [r.ebx, r.edx, r.ecx]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            vendor == b"GenuineIntel"
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`switch_on`] read once per process into `cell`: for switches asked on hot paths (every
/// product or attention call of a step), which no test toggles while running.
pub(crate) fn switch_once(cell: &'static std::sync::OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| switch_on(name))
}

/// Largest absolute difference between two tensors of the same shape (unit tests, here and in
/// `models`).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable f32 tensors")
}

/// `n` pseudo-random values in `[-spread / 2, spread / 2)` from `seed` (kernel tests).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
        })
        .collect()
}

/// Run the test `name` again in a child process with `var=1` set (the dispatch reads its
/// switches once per process), and check it passed and printed `marker`.
#[cfg(test)]
pub(crate) fn rerun_with(name: &str, var: &str, marker: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture"])
        .env(var, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(marker), "{text}");
}

#[cfg(test)]
mod tests {
    /// [`super::intel_cores`] names the vendor that Linux names (`vendor_id` in
    /// `/proc/cpuinfo`).
    #[test]
    fn intel_cores_names_the_vendor_linux_names() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(vendor) = info.lines().find_map(|l| {
            l.strip_prefix("vendor_id")
                .map(|v| v.trim_start_matches([' ', '\t', ':']))
        }) else {
            return;
        };
        assert_eq!(super::intel_cores(), vendor == "GenuineIntel", "{vendor}");
    }
}
