//! Optimizer updates over contiguous f32 slices, written to match
//! `torch.optim`'s single-tensor (`foreach=False`) kernels operation by
//! operation: scalars are computed in f64 as Python computes them, then used
//! as f32 in the element-wise arithmetic, in the same order torch evaluates it.
//!
//! Pure functions: no I/O, no allocation, no knowledge of chunks or rounds.

/// Hyperparameters of SGD, resolved (torch's defaults applied).
#[derive(Clone, Debug, PartialEq)]
pub struct SgdHyper {
    /// Base learning rate, before the schedule.
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// Step along the gradient (torch's `maximize`).
    pub maximize: bool,
}

/// Hyperparameters of Adam and AdamW, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamHyper {
    /// Base learning rate, before the schedule.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    /// AdamW: `p *= 1 - lr * wd` instead of adding `wd * p` to the gradient.
    pub decoupled: bool,
    /// Step along the gradient (torch's `maximize`).
    pub maximize: bool,
}

/// The optimizer of one param group.
#[derive(Clone, Debug, PartialEq)]
pub enum Hyper {
    Sgd(SgdHyper),
    Adam(AdamHyper),
}

impl Hyper {
    /// The group's base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Hyper::Sgd(h) => h.lr,
            Hyper::Adam(h) => h.lr,
        }
    }

    /// How many f32 state buffers of a parameter's size this optimizer keeps.
    pub fn state_buffers(&self) -> usize {
        match self {
            Hyper::Sgd(h) => usize::from(h.momentum != 0.0),
            Hyper::Adam(h) => 2 + usize::from(h.amsgrad),
        }
    }
}

/// Defines `pub fn $name`, which runs `$kernel` compiled with FMA
/// instructions (`$fma`) where the CPU has them, and as it is elsewhere.
/// The kernels' multiply-adds are then one instruction, and vectorized;
/// elsewhere `mul_add` is computed (exactly, slowly) in software. Doc
/// comments written first in the invocation document `$name`.
macro_rules! fma_dispatch {
    ($(#[$doc:meta])* $name:ident => $fma:ident, $kernel:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("fma") {
                #[allow(unsafe_code)]
                // SAFETY: `$fma` only needs the FMA instructions, which the
                // CPU has: checked just above.
                unsafe {
                    $fma($($arg),*);
                }
                return;
            }
            $kernel($($arg),*);
        }

        /// The kernel compiled with FMA instructions.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "fma")]
        #[allow(clippy::too_many_arguments)]
        fn $fma($($arg: $ty),*) {
            $kernel($($arg),*);
        }
    };
}

fma_dispatch!(
    /// One SGD step, `torch.optim.SGD` with `foreach=False`.
    ///
    /// `grad` is the round's gradient before clipping and `coef` the clip
    /// coefficient (1 without clipping: multiplying by 1 is exact). With
    /// `maximize` the gradient is negated, as torch negates it before anything
    /// else: `g * -coef` is exactly `-(g * coef)`.
    /// `buf` is the momentum buffer (empty when momentum is 0); `buf_init` says
    /// whether it holds a value yet (torch creates it from the first gradient).
    sgd => sgd_fma, sgd_kernel(
        h: &SgdHyper,
        lr: f64,
        coef: f32,
        grad: &[f32],
        param: &mut [f32],
        buf: &mut [f32],
        buf_init: bool,
    )
);

#[inline(always)]
fn sgd_kernel(
    h: &SgdHyper,
    lr: f64,
    coef: f32,
    grad: &[f32],
    param: &mut [f32],
    buf: &mut [f32],
    buf_init: bool,
) {
    let coef = if h.maximize { -coef } else { coef };
    let wd = h.weight_decay as f32;
    let neg_lr = (-lr) as f32;
    let decay = h.weight_decay != 0.0;
    // torch's `add_(x, alpha=a)` rounds `self + a * x` once (a fused
    // multiply-add on CPUs that have one, which its kernels use), and so
    // does every `mul_add` here; a plain multiply rounds on its own, as
    // torch's `mul_` does.
    if h.momentum == 0.0 {
        for (p, g) in param.iter_mut().zip(grad) {
            let mut d = *g * coef;
            if decay {
                d = p.mul_add(wd, d);
            }
            *p = d.mul_add(neg_lr, *p);
        }
        return;
    }
    let m = h.momentum as f32;
    let one_minus_damp = (1.0 - h.dampening) as f32;
    for ((p, g), b) in param.iter_mut().zip(grad).zip(buf.iter_mut()) {
        let mut d = *g * coef;
        if decay {
            d = p.mul_add(wd, d);
        }
        *b = if buf_init {
            d.mul_add(one_minus_damp, *b * m)
        } else {
            d
        };
        let d = if h.nesterov { b.mul_add(m, d) } else { *b };
        *p = d.mul_add(neg_lr, *p);
    }
}

/// The buffers of one parameter's Adam state.
pub struct AdamState<'a> {
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    /// Empty unless amsgrad.
    pub max_exp_avg_sq: &'a mut [f32],
}

fma_dispatch!(
    /// One Adam or AdamW step, `torch.optim.Adam`/`AdamW` with `foreach=False`.
    ///
    /// `step` is the parameter's step count after this update (torch increments
    /// `state['step']` first), so the bias corrections use `step >= 1`.
    ///
    /// Rounded as torch's CPU kernels round: the weight decay's add with alpha,
    /// `lerp_` and `addcmul_` are fused multiply-adds (rounded once), every
    /// other operation rounds on its own. One difference is left: torch takes
    /// `exp_avg_sq.sqrt()` from MKL's vector math, which is not correctly
    /// rounded (on an AVX-512 CPU about 0.6% of roots are one unit in the
    /// last place below the exact one), while this kernel's root is exact.
    adam => adam_fma, adam_kernel(
        h: &AdamHyper,
        lr: f64,
        step: u64,
        coef: f32,
        grad: &[f32],
        param: &mut [f32],
        s: AdamState<'_>,
    )
);

#[inline(always)]
fn adam_kernel(
    h: &AdamHyper,
    lr: f64,
    step: u64,
    coef: f32,
    grad: &[f32],
    param: &mut [f32],
    s: AdamState<'_>,
) {
    // torch negates the gradient first; `g * -coef` is exactly `-(g * coef)`.
    let coef = if h.maximize { -coef } else { coef };
    let step = step as f64;
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let bias_correction2 = 1.0 - h.beta2.powf(step);
    let step_size = lr / bias_correction1;
    let neg_step_size = (-step_size) as f32;
    let bc2_sqrt = bias_correction2.sqrt() as f32;
    let eps = h.eps as f32;
    let wd = h.weight_decay as f32;
    let decay_factor = (1.0 - lr * h.weight_decay) as f32;
    let coupled = h.weight_decay != 0.0 && !h.decoupled;
    let decoupled = h.weight_decay != 0.0 && h.decoupled;
    // torch's lerp(m, g, w) switches formula at |w| = 0.5 for accuracy.
    let w = (1.0 - h.beta1) as f32;
    let small_w = w.abs() < 0.5;
    let one_minus_w = 1.0 - w;
    let b2 = h.beta2 as f32;
    let one_minus_b2 = (1.0 - h.beta2) as f32;

    let it = param
        .iter_mut()
        .zip(grad)
        .zip(s.exp_avg.iter_mut())
        .zip(s.exp_avg_sq.iter_mut());
    if h.amsgrad {
        for ((((p, g), m), v), vmax) in it.zip(s.max_exp_avg_sq.iter_mut()) {
            let g = grad_with_decay(*g * coef, p, coupled, decoupled, wd, decay_factor);
            *m = lerp(*m, g, w, small_w, one_minus_w);
            // `mul_(b2)`, then `addcmul_(g, g, value)`: `(value * g) * g + v`
            // with its last multiply-add fused.
            *v = (one_minus_b2 * g).mul_add(g, *v * b2);
            *vmax = vmax.max(*v);
            let denom = vmax.sqrt() / bc2_sqrt + eps;
            *p += neg_step_size * *m / denom;
        }
    } else {
        for (((p, g), m), v) in it {
            let g = grad_with_decay(*g * coef, p, coupled, decoupled, wd, decay_factor);
            *m = lerp(*m, g, w, small_w, one_minus_w);
            *v = (one_minus_b2 * g).mul_add(g, *v * b2);
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += neg_step_size * *m / denom;
        }
    }
}

/// Applies weight decay the way torch's Adam (`g + wd * p`) or AdamW
/// (`p *= 1 - lr * wd`, before the moments) does, returning the gradient.
#[inline(always)]
fn grad_with_decay(
    g: f32,
    p: &mut f32,
    coupled: bool,
    decoupled: bool,
    wd: f32,
    decay_factor: f32,
) -> f32 {
    if decoupled {
        *p *= decay_factor;
    }
    if coupled { p.mul_add(wd, g) } else { g }
}

/// torch's `lerp`, as its vectorized CPU kernel computes it: one fused
/// multiply-add from whichever end is nearer.
#[inline(always)]
fn lerp(start: f32, end: f32, w: f32, small_w: bool, one_minus_w: f32) -> f32 {
    if small_w {
        w.mul_add(end - start, start)
    } else {
        (-one_minus_w).mul_add(end - start, end)
    }
}

#[cfg(test)]
mod tests;
