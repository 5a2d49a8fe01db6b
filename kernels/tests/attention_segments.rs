//! The attention kernel's split of a long decode step's keys into segments (computed in parallel and merged by
//! log-sum-exp): against the f64 reference, and the paged call bit-for-bit equal to the contiguous one, over more
//! keys than one segment holds and with masks that end a query's keys mid-segment.

use switchyard_kernels::attention::{
    attention, attention_reference, paged_attention, AttentionMask, AttentionShape, PagedKv,
};

fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Keys `key_start .. key_start + t_k` in blocks of `block_size` positions aligned to absolute positions; slots
/// outside the keys hold NaN, which must never be read.
fn into_blocks(k: &[f32], v: &[f32], row: usize, key_start: usize, block_size: usize) -> (Vec<Vec<f32>>, usize) {
    let t_k = k.len() / row;
    let first_block = key_start / block_size;
    let blocks = (first_block..(key_start + t_k).div_ceil(block_size))
        .map(|b| {
            let mut block = vec![f32::NAN; 2 * block_size * row];
            for slot in 0..block_size {
                let position = b * block_size + slot;
                if (key_start..key_start + t_k).contains(&position) {
                    let from = (position - key_start) * row;
                    block[slot * row..(slot + 1) * row].copy_from_slice(&k[from..from + row]);
                    block[(block_size + slot) * row..(block_size + slot + 1) * row]
                        .copy_from_slice(&v[from..from + row]);
                }
            }
            block
        })
        .collect();
    (blocks, first_block)
}

#[test]
fn long_decode_steps_match_the_reference_and_paged_equals_contiguous() {
    let key_start = 112;
    let t_k = 9000;
    for shape in [
        AttentionShape { q_heads: 16, kv_heads: 4, head_dim: 128 },
        AttentionShape { q_heads: 6, kv_heads: 2, head_dim: 19 },
    ] {
        let row = shape.kv_heads * shape.head_dim;
        let (k, v) = (values(1, t_k * row), values(2, t_k * row));
        // One query (a decode step) and a few (a short step: still one tile), past the keys and in their middle.
        for positions in [vec![key_start + t_k + 5], vec![5000, 5001, 9100, 2]] {
            let q = values(3, positions.len() * shape.q_heads * shape.head_dim);
            for mask in [AttentionMask::Causal, AttentionMask::Chunked { chunk: 3000 }] {
                let scale = 1.0 / (shape.head_dim as f32).sqrt();
                let what = format!("{shape:?} {positions:?} {mask:?}");
                let mut out = vec![f32::NAN; q.len()];
                let mut lse = vec![f32::NAN; positions.len() * shape.q_heads];
                attention(&q, &positions, &k, &v, key_start, shape, mask, scale, &mut out, Some(&mut lse))
                    .expect("attention");
                let mut want = vec![f32::NAN; q.len()];
                let mut want_lse = vec![f32::NAN; lse.len()];
                attention_reference(
                    &q,
                    &positions,
                    &k,
                    &v,
                    key_start,
                    shape,
                    mask,
                    scale,
                    &mut want,
                    Some(&mut want_lse),
                )
                .expect("reference");
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 2e-6 + 1e-5 * w.abs(), "{what}: out[{i}] = {g}, want {w}");
                }
                for (i, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
                    if w == f32::NEG_INFINITY {
                        assert_eq!(g, w, "{what}: lse[{i}]");
                    } else {
                        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}: lse[{i}] = {g}, want {w}");
                    }
                }
                let (blocks, first_block) = into_blocks(&k, &v, row, key_start, 16);
                let paged = PagedKv { blocks: &blocks, first_block, block_size: 16, len: key_start + t_k };
                let mut paged_out = vec![f32::NAN; q.len()];
                let mut paged_lse = vec![f32::NAN; lse.len()];
                paged_attention(&q, &positions, paged, shape, mask, scale, &mut paged_out, Some(&mut paged_lse))
                    .expect("paged attention");
                assert_eq!(paged_out, out, "{what}");
                assert_eq!(paged_lse, lse, "{what}");
            }
        }
    }
}
