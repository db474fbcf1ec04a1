//! Optimizer kernels against the machine's memory bandwidth.
//!
//! Every kernel runs the way the server runs it (chunks of 4 MiB applied in
//! parallel on the compute pool) and is timed alternately with a reference
//! triad over the same number of elements, in the same process, so the
//! printed ratios hold however noisy the machine is.
//!
//! `cargo bench -p paramd --bench kernels [-- --params N --tensors K --repeat R --json]`

use std::time::Instant;

use paramd::chunk::ChunkState;
use paramd::clip::sum_squares;
use paramd::layout::{DEFAULT_CHUNK_BYTES, Layout};
use paramd::optim::{AdamHyper, Hyper, SgdHyper};
use paramd::spec::ParamInfo;
use rayon::prelude::*;

struct Args {
    params: usize,
    tensors: usize,
    repeat: usize,
    json: bool,
}

fn args() -> Args {
    let mut a = Args {
        params: 16 << 20,
        tensors: 1,
        repeat: 15,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse::<usize>().ok());
        match flag.as_str() {
            "--params" => a.params = value().unwrap_or(a.params),
            "--tensors" => a.tensors = value().unwrap_or(a.tensors).max(1),
            "--repeat" => a.repeat = value().unwrap_or(a.repeat).max(3),
            "--json" => a.json = true,
            // cargo bench passes --bench; anything else is ignored.
            _ => {}
        }
    }
    a
}

/// The chunks of `tensors` tensors holding `params` elements in all, as the
/// server would hold them, with a gradient buffer per chunk.
fn chunks(params: usize, tensors: usize, hyper: &Hyper) -> (Vec<ChunkState>, Vec<Vec<f32>>) {
    let infos: Vec<ParamInfo> = (0..tensors)
        .map(|t| {
            let numel = params / tensors + usize::from(t < params % tensors);
            ParamInfo {
                name: format!("t{t}"),
                shape: vec![numel as u64],
                numel,
                group: 0,
            }
        })
        .collect();
    let layout = Layout::new(&infos, DEFAULT_CHUNK_BYTES);
    let states = layout
        .chunks
        .par_iter()
        .map(|c| ChunkState::new((0..c.len).map(|i| (i % 97) as f32 * 0.01).collect(), hyper))
        .collect();
    let grads = layout
        .chunks
        .par_iter()
        .map(|c| {
            (0..c.len)
                .map(|i| ((i % 89) as f32 - 44.0) * 1e-3)
                .collect()
        })
        .collect();
    (states, grads)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A kernel: the optimizer it runs, with or without clipping.
struct Kernel {
    name: &'static str,
    hyper: Hyper,
    /// A separate norm pass, and the update scaled by the clip coefficient.
    clip: bool,
}

fn main() {
    let a = args();
    let sgd = Hyper::Sgd(SgdHyper {
        lr: 0.01,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    });
    let adam = |decoupled: bool| {
        Hyper::Adam(AdamHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
            decoupled,
            maximize: false,
        })
    };
    let kernel = |name, hyper: &Hyper, clip| Kernel {
        name,
        hyper: hyper.clone(),
        clip,
    };
    let kernels = [
        kernel("sgd_momentum", &sgd, false),
        kernel("adam", &adam(false), false),
        kernel("adamw", &adam(true), false),
        kernel("adamw_clip", &adam(true), true),
    ];
    // The triad reference: a = b + s * c over the same elements, in chunks
    // of the same size, on the same pool.
    let (mut tri_a, tri_bc) = chunks(a.params, a.tensors, &sgd_like());
    for k in &kernels {
        let (mut states, grads) = chunks(a.params, a.tensors, &k.hyper);
        let bytes_per_elem =
            4 * (2 * (1 + k.hyper.state_buffers()) + 1) + if k.clip { 4 } else { 0 };
        let (mut kt, mut tt) = (Vec::new(), Vec::new());
        for step in 1..=a.repeat {
            let t = Instant::now();
            tri_a.par_iter_mut().zip(&tri_bc).for_each(|(x, c)| {
                let (_, b) = x.state.named()[0];
                for ((o, b), c) in x.values.make_mut().iter_mut().zip(b).zip(c) {
                    *o = *b + 0.5 * *c;
                }
            });
            tt.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let coef = if k.clip {
                // The global norm, as its own pass over the gradient.
                let total: f64 = grads.par_iter().map(|g| sum_squares(g).0).sum();
                (1.0 / (total.sqrt() as f32 + 1e-6)).min(1.0)
            } else {
                1.0
            };
            states.par_iter_mut().zip(&grads).for_each(|(s, g)| {
                s.step = step as u64 - 1;
                s.apply(&k.hyper, 1e-3, coef, g);
            });
            kt.push(t.elapsed().as_secs_f64());
        }
        // The first pass touches fresh memory; leave it out.
        let (ks, ts) = (median(kt[1..].to_vec()), median(tt[1..].to_vec()));
        let gbps = (a.params * bytes_per_elem) as f64 / ks / 1e9;
        let triad_gbps = (a.params * 12) as f64 / ts / 1e9;
        if a.json {
            println!(
                "{{\"kernel\":\"{}\",\"params\":{},\"tensors\":{},\"step_seconds_median\":{ks:.6},\"gbps\":{gbps:.3},\"triad_gbps\":{triad_gbps:.3},\"vs_triad\":{:.3}}}",
                k.name,
                a.params,
                a.tensors,
                gbps / triad_gbps
            );
        } else {
            println!(
                "{:<14} {} params in {} tensors: {:>8.3} ms/step  {:>6.2} GB/s  triad {:>6.2} GB/s  ratio {:.2}",
                k.name,
                a.params,
                a.tensors,
                ks * 1e3,
                gbps,
                triad_gbps,
                gbps / triad_gbps
            );
        }
    }
}

/// A state layout with one buffer per element, used as the triad's `b`.
fn sgd_like() -> Hyper {
    Hyper::Sgd(SgdHyper {
        lr: 0.0,
        momentum: 1.0,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
    })
}
