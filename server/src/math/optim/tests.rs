//! Unit tests of the optimizer kernels: torch's values, bit for bit.

use super::*;

/// Moments torch 2.15 computed on an x86-64 CPU with FMA
/// (`exp_avg.lerp_(g, 0.1)`, `exp_avg_sq.mul_(0.999).addcmul_(g, g,
/// value=0.001)`): m, g, v, then the new m and v. Rounding each
/// multiply and add on its own gives other last bits for all of them.
#[test]
fn adam_rounds_its_moments_as_torch_does() {
    let cases: [(f64, f64, f64, f64, f64); 4] = [
        (
            -0.00489586777985096,
            0.16840654611587524,
            0.00024527014466002584,
            0.01243437360972166,
            0.0002733856381382793,
        ),
        (
            -0.01210672315210104,
            -0.19226692616939545,
            0.00019370067457202822,
            -0.030122743919491768,
            0.000230473538977094,
        ),
        (
            0.007981923408806324,
            -0.15538135170936584,
            0.00010817331349244341,
            -0.00835440494120121,
            0.00013220850087236613,
        ),
        (
            8.630855154478922e-05,
            0.17615151405334473,
            3.864735481329262e-05,
            0.01769282855093479,
            6.963806663407013e-05,
        ),
    ];
    let h = AdamHyper {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        amsgrad: false,
        decoupled: false,
        maximize: false,
    };
    for (m0, g, v0, m1, v1) in cases {
        let (mut m, mut v, mut p) = ([m0 as f32], [v0 as f32], [0.5f32]);
        let s = AdamState {
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            max_exp_avg_sq: &mut [],
        };
        adam(&h, 0.01, 1, 1.0, &[g as f32], &mut p, s);
        assert_eq!(
            (m[0], v[0]),
            (m1 as f32, v1 as f32),
            "m {m0}, g {g}, v {v0}"
        );
    }
}

/// Values torch 2.x computed on an x86-64 CPU with FMA (`torch.optim.SGD`,
/// foreach=False, lr 10): p, g, the plain step, and the first step with
/// momentum 0.9, nesterov and weight decay 0.1. Rounding `p + (-lr * g)`
/// twice gives other last bits for every one of them.
#[test]
fn sgd_rounds_its_multiply_adds_once_as_torch_does() {
    let cases: [(f64, f64, f64, f64); 4] = [
        (
            -0.22993287444114685,
            -0.07520250231027603,
            0.5220921635627747,
            1.6357871294021606,
        ),
        (
            -2.346050500869751,
            0.4216870367527008,
            -6.562921047210693,
            -5.900608062744141,
        ),
        (
            0.7455052137374878,
            -1.1215951442718506,
            11.961456298828125,
            20.639352798461914,
        ),
        (
            -0.6676825284957886,
            -0.4890671372413635,
            4.222989082336426,
            9.8931884765625,
        ),
    ];
    for (p0, g, plain, nesterov) in cases {
        let (p0, g) = (p0 as f32, g as f32);
        let lr10 = |h: SgdHyper| {
            let mut p = [p0];
            let mut buf = [0.0f32];
            sgd(&h, 10.0, 1.0, &[g], &mut p, &mut buf, false);
            p[0]
        };
        assert_eq!(
            lr10(sgd_hyper(0.0, 0.0, 0.0, false)),
            plain as f32,
            "p {p0} g {g}"
        );
        assert_eq!(
            lr10(sgd_hyper(0.9, 0.0, 0.1, true)),
            nesterov as f32,
            "p {p0} g {g}"
        );
    }
}

fn sgd_hyper(momentum: f64, dampening: f64, weight_decay: f64, nesterov: bool) -> SgdHyper {
    SgdHyper {
        lr: 0.1,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize: false,
    }
}

fn adam_hyper(weight_decay: f64, amsgrad: bool, decoupled: bool) -> AdamHyper {
    AdamHyper {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
        amsgrad,
        decoupled,
        maximize: false,
    }
}

fn close(a: f32, b: f64) -> bool {
    (f64::from(a) - b).abs() <= 1e-6 + 1e-5 * b.abs()
}

#[test]
fn plain_sgd_is_p_minus_lr_g() {
    let h = sgd_hyper(0.0, 0.0, 0.0, false);
    let mut p = [1.0f32, -2.0];
    sgd(&h, 0.1, 1.0, &[0.5, 0.25], &mut p, &mut [], false);
    assert!(close(p[0], 0.95) && close(p[1], -2.025), "{p:?}");
}

#[test]
fn sgd_momentum_dampening_and_decay_follow_torch() {
    // torch: d = g + wd*p; buf = d (first step), then buf = m*buf + (1-damp)*d.
    let h = sgd_hyper(0.9, 0.1, 0.01, false);
    let (mut p, mut buf) = ([1.0f32], [0.0f32]);
    sgd(&h, 0.1, 1.0, &[0.5], &mut p, &mut buf, false);
    // d = 0.5 + 0.01 = 0.51, buf = 0.51, p = 1 - 0.051 = 0.949
    assert!(close(buf[0], 0.51) && close(p[0], 0.949), "{p:?} {buf:?}");
    sgd(&h, 0.1, 1.0, &[0.5], &mut p, &mut buf, true);
    // d = 0.5 + 0.00949 = 0.50949, buf = 0.459 + 0.9*0.50949 = 0.917541
    assert!(close(buf[0], 0.917_541), "{buf:?}");
    assert!(close(p[0], 0.949 - 0.091_754_1), "{p:?}");
}

#[test]
fn sgd_nesterov_looks_ahead() {
    let h = sgd_hyper(0.9, 0.0, 0.0, true);
    let (mut p, mut buf) = ([0.0f32], [0.0f32]);
    sgd(&h, 1.0, 1.0, &[1.0], &mut p, &mut buf, false);
    // buf = 1, d = 1 + 0.9 * 1 = 1.9
    assert!(close(p[0], -1.9), "{p:?}");
    sgd(&h, 1.0, 1.0, &[1.0], &mut p, &mut buf, true);
    // buf = 1.9, d = 1 + 0.9 * 1.9 = 2.71
    assert!(close(p[0], -4.61), "{p:?}");
}

#[test]
fn clip_coefficient_scales_the_gradient() {
    let h = sgd_hyper(0.0, 0.0, 0.0, false);
    let mut p = [0.0f32];
    sgd(&h, 1.0, 0.5, &[2.0], &mut p, &mut [], false);
    assert_eq!(p[0], -1.0);
}

/// Reference Adam step in f64, straight from torch's formulas.
fn adam_ref(h: &AdamHyper, lr: f64, steps: &[f64], mut p: f64) -> f64 {
    let (mut m, mut v, mut vmax) = (0.0, 0.0, 0.0f64);
    for (i, &g0) in steps.iter().enumerate() {
        let t = (i + 1) as f64;
        let mut g = g0;
        if h.decoupled {
            p *= 1.0 - lr * h.weight_decay;
        } else {
            g += h.weight_decay * p;
        }
        m = h.beta1 * m + (1.0 - h.beta1) * g;
        v = h.beta2 * v + (1.0 - h.beta2) * g * g;
        vmax = vmax.max(v);
        let vv = if h.amsgrad { vmax } else { v };
        let denom = vv.sqrt() / (1.0 - h.beta2.powf(t)).sqrt() + h.eps;
        p -= lr / (1.0 - h.beta1.powf(t)) * m / denom;
    }
    p
}

fn run_adam(h: &AdamHyper, grads: &[f64]) -> f32 {
    let (mut p, mut m, mut v, mut vmax) = ([0.5f32], [0f32], [0f32], [0f32]);
    for (i, g) in grads.iter().enumerate() {
        let vmax: &mut [f32] = if h.amsgrad { &mut vmax } else { &mut [] };
        let s = AdamState {
            exp_avg: &mut m,
            exp_avg_sq: &mut v,
            max_exp_avg_sq: vmax,
        };
        adam(h, h.lr, i as u64 + 1, 1.0, &[*g as f32], &mut p, s);
    }
    p[0]
}

#[test]
fn adam_first_step_moves_by_lr() {
    // With bias correction the first Adam step is lr * sign(g).
    let h = adam_hyper(0.0, false, false);
    assert!(close(run_adam(&h, &[3.0]), 0.49));
}

#[test]
fn adam_adamw_and_amsgrad_match_the_f64_reference() {
    let grads = [0.3, -1.2, 0.05, 2.0, -0.7, 0.0, 1.1];
    for h in [
        adam_hyper(0.0, false, false),
        adam_hyper(0.1, false, false),
        adam_hyper(0.1, false, true),
        adam_hyper(0.0, true, false),
        adam_hyper(0.05, true, true),
    ] {
        let want = adam_ref(&h, h.lr, &grads, 0.5);
        let got = run_adam(&h, &grads);
        assert!(close(got, want), "{h:?}: got {got}, want {want}");
    }
}

#[test]
fn adam_with_zero_lr_only_updates_moments() {
    let h = adam_hyper(0.1, false, true);
    let (mut p, mut m, mut v) = ([0.5f32], [0f32], [0f32]);
    let s = AdamState {
        exp_avg: &mut m,
        exp_avg_sq: &mut v,
        max_exp_avg_sq: &mut [],
    };
    adam(&h, 0.0, 1, 1.0, &[1.0], &mut p, s);
    assert_eq!(p[0], 0.5);
    assert!(close(m[0], 0.1) && close(v[0], 0.001));
}

/// torch negates the gradient first: maximizing a gradient is exactly
/// minimizing its negation, clipped or not, in every kernel.
#[test]
fn maximize_steps_exactly_as_the_negated_gradient() {
    let grad = [0.3f32, -1.7, 2.5e-3, 0.0];
    let neg: Vec<f32> = grad.iter().map(|g| -g).collect();
    let p0 = [1.0f32, -0.25, 3.0, 0.5];
    for coef in [1.0f32, 0.37] {
        for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
            let h = sgd_hyper(momentum, 0.0, 0.01, nesterov);
            let up = SgdHyper {
                maximize: true,
                ..h.clone()
            };
            let (mut a, mut b) = (p0, p0);
            let (mut ba, mut bb) = ([0.0f32; 4], [0.0f32; 4]);
            let nb = if momentum == 0.0 { 0 } else { 4 };
            for step in 0..3 {
                sgd(&up, 0.1, coef, &grad, &mut a, &mut ba[..nb], step > 0);
                sgd(&h, 0.1, coef, &neg, &mut b, &mut bb[..nb], step > 0);
            }
            assert_eq!(
                a.map(f32::to_bits),
                b.map(f32::to_bits),
                "SGD {momentum} {nesterov}"
            );
        }
        for (decoupled, amsgrad) in [(false, false), (true, false), (true, true)] {
            let h = adam_hyper(0.01, amsgrad, decoupled);
            let up = AdamHyper {
                maximize: true,
                ..h.clone()
            };
            let (mut a, mut b) = (p0, p0);
            let mut sa = [[0.0f32; 4]; 3];
            let mut sb = [[0.0f32; 4]; 3];
            for step in 1..4 {
                for (h, g, p, s) in [
                    (&up, &grad[..], &mut a, &mut sa),
                    (&h, &neg[..], &mut b, &mut sb),
                ] {
                    let [m, v, vmax] = s;
                    let state = AdamState {
                        exp_avg: m,
                        exp_avg_sq: v,
                        max_exp_avg_sq: if amsgrad { vmax } else { &mut [] },
                    };
                    adam(h, 0.01, step, coef, g, p, state);
                }
            }
            assert_eq!(
                a.map(f32::to_bits),
                b.map(f32::to_bits),
                "Adam {decoupled} {amsgrad}"
            );
        }
    }
}
