//! Expert selection from router logits. Llama 4 routes each token to its top-1 expert; [`top_k`] is the general
//! form. Ties go to the lower expert index, like `torch.topk`; a NaN logit counts as larger than any number (also
//! like `torch.topk`), so a broken router shows up as a NaN score rather than a silently plausible expert.
//!
//! These run on `[tokens, experts]` with experts in the hundreds: a scalar scan is already far below the cost of
//! computing the logits, so there is no SIMD or threaded version.

use crate::error::KernelError;

fn check(op: &'static str, logits: &[f32], experts: usize, k: usize) -> Result<usize, KernelError> {
    if experts == 0 {
        return Err(KernelError::invalid(op, "experts is 0"));
    }
    if logits.len() % experts != 0 {
        return Err(KernelError::shape(
            op,
            format!("logits has {} values, not a multiple of experts = {experts}", logits.len()),
        ));
    }
    if k == 0 || k > experts {
        return Err(KernelError::invalid(op, format!("k = {k} must be in 1..={experts} (the number of experts)")));
    }
    Ok(logits.len() / experts)
}

/// `a` ranks before `b`: larger, NaN above every number.
#[inline]
fn beats(a: f32, b: f32) -> bool {
    (a.is_nan() && !b.is_nan()) || a > b
}

/// For each row of `logits` (`[tokens, experts]`) the index of the largest logit (the first one on ties) and its
/// value.
pub fn top1(logits: &[f32], experts: usize) -> Result<Vec<(u32, f32)>, KernelError> {
    check("top1", logits, experts, 1)?;
    Ok(logits
        .chunks_exact(experts)
        .map(|row| {
            let mut best = 0;
            for (e, &v) in row.iter().enumerate().skip(1) {
                if beats(v, row[best]) {
                    best = e;
                }
            }
            (best as u32, row[best])
        })
        .collect())
}

/// For each row of `logits` (`[tokens, experts]`) the `k` largest logits with their expert indices, largest first,
/// ties by lower index. The result is flat: row `t`'s picks are `[t * k, (t + 1) * k)`.
pub fn top_k(logits: &[f32], experts: usize, k: usize) -> Result<Vec<(u32, f32)>, KernelError> {
    let tokens = check("top_k", logits, experts, k)?;
    let mut picks = Vec::with_capacity(tokens * k);
    let mut order: Vec<u32> = Vec::with_capacity(experts);
    for row in logits.chunks_exact(experts) {
        order.clear();
        order.extend(0..experts as u32);
        // A stable sort keeps equal logits in index order, which is the tie rule.
        order.sort_by(|&a, &b| {
            let (va, vb) = (row[a as usize], row[b as usize]);
            if beats(va, vb) {
                std::cmp::Ordering::Less
            } else if beats(vb, va) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        picks.extend(order[..k].iter().map(|&e| (e, row[e as usize])));
    }
    Ok(picks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_takes_the_first_of_equal_logits() {
        let logits =
            [1.0f32, 3.0, 3.0, 2.0, /* row 2 */ -1.0, -1.0, -1.0, -1.0, /* row 3 */ 0.0, 0.0, 0.0, 5.0];
        assert_eq!(top1(&logits, 4).expect("top1"), vec![(1, 3.0), (0, -1.0), (3, 5.0)]);
        assert_eq!(top1(&[], 4).expect("no tokens"), vec![]);
        assert_eq!(top1(&[2.0, f32::NAN, 9.0], 3).expect("nan")[0].0, 1, "NaN ranks first, like torch.topk");
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let logits = [1.0f32, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(top_k(&logits, 5, 3).expect("top_k"), vec![(1, 3.0), (2, 3.0), (4, 3.0)]);
        assert_eq!(top_k(&logits, 5, 5).expect("all")[3..], [(3, 2.0), (0, 1.0)]);
        // top_k with k = 1 agrees with top1 on every row.
        let many: Vec<f32> = (0..60).map(|i| ((i * 37) % 11) as f32).collect();
        let pairs = top_k(&many, 6, 1).expect("top_k");
        assert_eq!(pairs, top1(&many, 6).expect("top1"));
    }

    #[test]
    fn refuses_bad_shapes() {
        assert!(matches!(top1(&[1.0; 5], 2), Err(KernelError::Shape { op: "top1", .. })));
        assert!(matches!(top1(&[1.0; 4], 0), Err(KernelError::InvalidArgument { .. })));
        assert!(top_k(&[1.0; 4], 2, 3).is_err());
        assert!(top_k(&[1.0; 4], 2, 0).is_err());
    }
}
