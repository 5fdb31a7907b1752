//! With `FERROFORMERS_NO_SIMD=1` the GGUF integer kernels take their portable copy (as on a CPU
//! without AVX2), and the products still equal the plain reference: dequantized weights times
//! the activations rounded to 8 bits, in f64. Its own test binary, so the variable is set
//! before anything reads it.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ferroformers::kernels::cpu::blocks::{self, block_shape, QuantizedRows};
use ferroformers::kernels::cpu::quantized::{QuantLinear, QuantMath};

#[test]
fn forced_portable_path_matches_reference() {
    std::env::set_var("FERROFORMERS_NO_SIMD", "1");
    assert!(
        !blocks::avx2(),
        "FERROFORMERS_NO_SIMD=1 must turn the AVX2 kernels off"
    );
    let (n, k) = (9usize, 512usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
        .collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
        .collect();
    for dt in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, dt).unwrap();
        let dense: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (sb, _) = block_shape(dt).unwrap();
        // No raw-block kernel without AVX2: the unpacked portable dot runs.
        assert!(!blocks::raw_kernels(dt, true) && !blocks::raw_kernels(dt, false));
        assert!(
            blocks::dot_int_blocks(dt, &[], QuantizedRows::quantize(&x, k, sb).row(0)).is_none()
        );
        let xq = QuantizedRows::quantize(&x, k, sb);
        let row = xq.row(0);
        let got = QuantLinear::new(&q)
            .unwrap()
            .unwrap()
            .with_math(QuantMath::Int8)
            .matmul(&x, 1);
        for r in 0..n {
            let want: f64 = (0..k)
                .map(|i| dense[r * k + i] as f64 * row.d[i / sb] as f64 * row.q[i] as f64)
                .sum();
            let tol = 2e-3 * (1.0 + want.abs());
            assert!(
                (got[r] as f64 - want).abs() < tol,
                "{dt:?} row {r}: {} vs {want}",
                got[r]
            );
        }
    }
}
