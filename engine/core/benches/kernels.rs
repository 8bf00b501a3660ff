//! Micro-benchmark of the CPU matmul kernels on TinyLlama-1.1B shapes.
//!
//!     cargo bench -p vibee-core --bench kernels [-- THREADS [MODEL_DIR]]
//!
//! With a model directory, the weights are also read in place from its memory-mapped
//! safetensors (layer 0's MLP and the LM head), as decode reads them.
//! Prints, per weight dtype and shape, the time of one GEMV (decode), one 32-row product (a
//! batched decode step) and one 128-row GEMM (prefill), and the weight bytes streamed per
//! second during the GEMV.

use std::time::Instant;

use half::bf16;
use vibee_core::backend::cpu::kernels::linear;
use vibee_core::backend::quant::packed::{PackedLinear, PackedMatrix};
use vibee_core::io::blocks;
use vibee_core::io::weights::{DType, Weight};
use vibee_core::model::ops::Linear;
use vibee_core::Matrix;

fn weight(out: usize, inp: usize, dtype: DType) -> Weight {
    let values: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    match dtype {
        DType::F32 => Weight::from_f32(&values, vec![out, inp]),
        DType::Q8_0 => Weight::from_bytes(blocks::quantize_q8_0(&values), dtype, vec![out, inp]),
        DType::Q4_0 => Weight::from_bytes(blocks::quantize_q4_0(&values), dtype, vec![out, inp]),
        DType::Q4K | DType::Q6K => {
            // Random super-blocks with a small finite f16 scale (every bit pattern is valid).
            let (per_block, block_bytes) = dtype.block();
            let mut bytes: Vec<u8> = (0..out * inp / per_block * block_bytes)
                .map(|i| (i * 7919 % 251) as u8)
                .collect();
            let scale = half::f16::from_f32(0.01).to_le_bytes();
            for block in bytes.chunks_exact_mut(block_bytes) {
                let at: &[usize] = if dtype == DType::Q6K { &[208] } else { &[0, 2] };
                for a in at {
                    block[*a..*a + 2].copy_from_slice(&scale);
                }
            }
            Weight::from_bytes(bytes, dtype, vec![out, inp])
        }
        DType::F16 => {
            let bytes = values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes());
            Weight::from_bytes(bytes.collect(), dtype, vec![out, inp])
        }
        _ => {
            let bytes = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes());
            Weight::from_bytes(bytes.collect(), DType::BF16, vec![out, inp])
        }
    }
}

fn best_of<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // `cargo bench` appends `--bench`: only the positional arguments are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let threads = args.first().and_then(|a| a.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    println!("{threads} threads");
    if let Some(dir) = args.get(1) {
        let weights = vibee_core::io::weights::Weights::open(std::path::Path::new(&dir)).unwrap();
        for (name, out, inp) in [
            ("model.layers.0.mlp.gate_proj.weight", 5632, 2048),
            ("model.layers.0.mlp.down_proj.weight", 2048, 5632),
            ("lm_head.weight", 32000, 2048),
        ] {
            let w = weights.get(name, &[out, inp]).unwrap();
            let x1 = Matrix::from_vec(1, inp, vec![0.5; inp]);
            let gemv = best_of(20, || {
                std::hint::black_box(linear(&x1, &w));
            });
            println!(
                "mapped {} {name} gemv {:.3} ms ({:.1} GB/s)",
                w.dtype,
                gemv * 1e3,
                w.bytes() as f64 / gemv / 1e9
            );
        }
        // Every layer's MLP in turn, as one decode step streams them.
        let mlp: Vec<_> = (0..22)
            .flat_map(|l| {
                ["gate_proj", "up_proj"].map(|p| {
                    weights
                        .get(&format!("model.layers.{l}.mlp.{p}.weight"), &[5632, 2048])
                        .unwrap()
                })
            })
            .collect();
        let x1 = Matrix::from_vec(1, 2048, vec![0.5; 2048]);
        let bytes: usize = mlp.iter().map(Weight::bytes).sum();
        let sweep = best_of(3, || {
            for w in &mlp {
                std::hint::black_box(linear(&x1, w));
            }
        });
        println!(
            "mapped sweep of 44 MLP matrices: {:.1} GB/s",
            bytes as f64 / sweep / 1e9
        );
        let inside = best_of(3, || {
            rayon::scope(|_| {
                for w in &mlp {
                    std::hint::black_box(linear(&x1, w));
                }
            })
        });
        println!(
            "mapped sweep from inside the pool: {:.1} GB/s",
            bytes as f64 / inside / 1e9
        );
        let all: Vec<(Weight, usize)> = (0..22)
            .flat_map(|l| {
                [
                    ("self_attn.q_proj", 2048, 2048),
                    ("self_attn.k_proj", 256, 2048),
                    ("self_attn.v_proj", 256, 2048),
                    ("self_attn.o_proj", 2048, 2048),
                    ("mlp.gate_proj", 5632, 2048),
                    ("mlp.up_proj", 5632, 2048),
                    ("mlp.down_proj", 2048, 5632),
                ]
                .map(|(p, o, i)| {
                    (
                        weights
                            .get(&format!("model.layers.{l}.{p}.weight"), &[o, i])
                            .unwrap(),
                        i,
                    )
                })
            })
            .collect();
        let xs = [
            Matrix::from_vec(1, 2048, vec![0.5; 2048]),
            Matrix::from_vec(1, 5632, vec![0.5; 5632]),
        ];
        let bytes_all: usize = all.iter().map(|(w, _)| w.bytes()).sum();
        let t = best_of(3, || {
            for (w, i) in &all {
                std::hint::black_box(linear(&xs[usize::from(*i == 5632)], w));
            }
        });
        println!(
            "mapped sweep of every layer matrix in forward order: {:.1} GB/s",
            bytes_all as f64 / t / 1e9
        );
        let owned: Vec<Weight> = mlp
            .iter()
            .map(|w| {
                let mut v = vec![0f32; w.numel()];
                w.row_to_f32(0, &mut v);
                Weight::from_f32(&v, w.shape.clone())
            })
            .collect();
        let t = best_of(3, || {
            for w in &owned {
                std::hint::black_box(linear(&x1, w));
            }
        });
        println!("owned sweep: {:.1} GB/s", bytes as f64 / t / 1e9);
    }
    for dtype in [
        DType::F32,
        DType::BF16,
        DType::F16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4K,
        DType::Q6K,
    ] {
        for (out, inp) in [
            (2048, 2048),
            (5632, 2048),
            (2048, 4096),
            (2048, 5632),
            (2048, 6144),
            (32000, 2048),
        ] {
            let w = weight(out, inp, dtype);
            let packed = PackedMatrix::from_gguf(&w).map(PackedLinear);
            let product = |x: &Matrix| match &packed {
                Some(p) => p.forward(x),
                None => linear(x, &w),
            };
            let x1 = Matrix::from_vec(1, inp, vec![0.5; inp]);
            let x32 = Matrix::from_vec(32, inp, vec![0.5; 32 * inp]);
            let x128 = Matrix::from_vec(128, inp, vec![0.5; 128 * inp]);
            let gemv = best_of(20, || {
                std::hint::black_box(product(&x1));
            });
            // 32 rows: a batched decode step of 32 sequences.
            let batch = best_of(5, || {
                std::hint::black_box(product(&x32));
            });
            let gemm = best_of(3, || {
                std::hint::black_box(product(&x128));
            });
            let gflops = |rows: f64, t: f64| 2.0 * rows * (out * inp) as f64 / t / 1e9;
            println!(
                "{dtype:>4} {out:>5}x{inp:<5} gemv {:>7.3} ms ({:>5.1} GB/s)  x32 {:>6.2} ms ({:>6.1} GFLOP/s)  gemm128 {:>7.2} ms ({:>6.1} GFLOP/s)",
                gemv * 1e3,
                packed.as_ref().map_or(w.bytes(), |p| p.weight_bytes()) as f64 / gemv / 1e9,
                batch * 1e3,
                gflops(32.0, batch),
                gemm * 1e3,
                gflops(128.0, gemm),
            );
        }
    }
}
