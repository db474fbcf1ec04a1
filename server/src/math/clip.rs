//! Global-norm clipping, as `torch.nn.utils.clip_grad_norm_`.

/// Sum of squares of a slice, accumulated in f64 so that the global norm
/// barely depends on how elements are grouped, and whether any value was
/// not finite (a square of any finite f32 is far below f64's range, so the
/// sum is finite exactly when every value is). The order of additions is
/// fixed: the result depends only on the slice.
pub fn sum_squares(g: &[f32]) -> (f64, bool) {
    let mut acc = [0.0f64; 8];
    let mut chunks = g.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f64::from(x) * f64::from(x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f64::from(x) * f64::from(x);
    }
    let sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    (sum, !sum.is_finite())
}

/// The global L2 norm from per-chunk sums of squares, added in the order
/// given (callers pass them in canonical chunk order), as f32 like torch's.
/// torch sums the squares in f32, so once they pass f32's range its norm is
/// infinite: so is this one, although the f64 sum is still finite (the
/// round is then a non-finite round, see `Policy::decide`).
pub fn global_norm(sums: impl IntoIterator<Item = f64>) -> f32 {
    let total: f64 = sums.into_iter().fold(0.0, |a, s| a + s);
    if total > f64::from(f32::MAX) {
        return f32::INFINITY;
    }
    total.sqrt() as f32
}

/// torch's `max_norm / (norm + 1e-6)` capped at 1. torch evaluates the
/// division as `reciprocal(norm + 1e-6) * max_norm` in f32, so do we.
pub fn clip_coefficient(norm: f32, max_norm: f64) -> f32 {
    let coef = (1.0f32 / (norm + 1e-6f32)) * max_norm as f32;
    coef.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_of_three_four_is_five() {
        let (s, bad) = sum_squares(&[3.0, 4.0]);
        assert!(!bad);
        assert_eq!(global_norm([s]), 5.0);
    }

    #[test]
    fn norm_splits_across_chunks() {
        let g: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        let whole = global_norm([sum_squares(&g).0]);
        let parts = global_norm(g.chunks(5).map(|c| sum_squares(c).0));
        assert!((whole - parts).abs() <= whole * 1e-7);
    }

    #[test]
    fn non_finite_values_are_reported() {
        assert!(sum_squares(&[1.0, f32::NAN]).1);
        assert!(sum_squares(&[1.0, 2.0, 3.0, 4.0, f32::INFINITY]).1);
        assert!(!sum_squares(&[1.0; 9]).1);
    }

    #[test]
    fn a_norm_whose_squares_overflow_f32_is_infinite() {
        // Finite gradients whose squares sum past f32::MAX, as torch sees them.
        let (s, bad) = sum_squares(&[2e19, 2e19]);
        assert!(!bad);
        let norm = global_norm([s]);
        assert_eq!(norm, f32::INFINITY);
        assert_eq!(clip_coefficient(norm, 1.0), 0.0);
        // Just under the range: finite, as torch's.
        let (s, _) = sum_squares(&[1e19]);
        assert!(global_norm([s]).is_finite());
    }

    #[test]
    fn coefficient_is_capped_at_one() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        let c = clip_coefficient(10.0, 1.0);
        assert!((c - 0.1).abs() < 1e-7, "{c}");
    }
}
