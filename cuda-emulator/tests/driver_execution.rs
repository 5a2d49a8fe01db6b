//! The emulated execution model, through the exported driver API and the self-test kernels of
//! cpp/kernels_selftest.cpp: barriers that exited threads leave, warp shuffles, dynamic shared memory (garbage until
//! written), thread and block indices, failures a GPU would hang or fault on, and the warp MMA's gathering.

mod driver_support;

use std::ffi::c_void;

use driver_support::{arg, context, download, free, function, launch, ok, ptx, upload};
use switchyard_cuda_emulator::error::{code, name};
use switchyard_cuda_emulator::memory::GARBAGE_BYTE;

#[test]
fn exited_threads_leave_the_block_barrier() {
    context();
    let kernel = "switchyard_emu_test_barrier_early_exit";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], "")]), kernel);
    let threads = 96u32;
    let mut counts = upload(&vec![u32::MAX; 2 * threads as usize]);
    ok(launch(f, [1, 1, 1], [threads, 1, 1], 0, &mut [arg(&mut counts)]));
    let got: Vec<u32> = download(counts, 2 * threads as usize);
    // Even threads survive the first exit (48 of them); those with t % 4 == 2 leave before the second barrier (24).
    for t in 0..threads as usize {
        let (first, second) = (got[2 * t], got[2 * t + 1]);
        match t % 4 {
            1 | 3 => assert_eq!((first, second), (u32::MAX, u32::MAX), "thread {t} exited first"),
            2 => assert_eq!((first, second), (48, 0), "thread {t}"),
            _ => assert_eq!((first, second), (48, 24), "thread {t}"),
        }
    }
    free(counts);
}

#[test]
fn shuffles_exchange_within_each_warp() {
    context();
    let kernel = "switchyard_emu_test_shuffle";
    let (_, f) = function(&ptx(&[(kernel, &[".u64", ".u64", ".u64"], "")]), kernel);
    let (blocks, threads) = (3u32, 64u32);
    let total = (blocks * threads) as usize;
    let input: Vec<f32> = (0..total).map(|i| (i * 7 % 13) as f32).collect();
    let mut in_dev = upload(&input);
    let mut sums = upload(&vec![0f32; total]);
    let mut swapped = upload(&vec![0f32; total]);
    ok(launch(f, [blocks, 1, 1], [threads, 1, 1], 0, &mut [arg(&mut in_dev), arg(&mut sums), arg(&mut swapped)]));
    let (got_sums, got_swapped): (Vec<f32>, Vec<f32>) = (download(sums, total), download(swapped, total));
    for t in 0..total {
        let warp = t / 32 * 32;
        let want: f32 = input[warp..warp + 32].iter().sum();
        assert_eq!(got_sums[t], want, "thread {t}: butterfly sum of its warp");
        assert_eq!(got_swapped[t], input[warp + ((t % 32) ^ 5)], "thread {t}: lane ^ 5");
    }
    for p in [in_dev, sums, swapped] {
        free(p);
    }
}

#[test]
fn dynamic_shared_memory_is_garbage_until_written_and_shared_by_the_block() {
    context();
    let kernel = "switchyard_emu_test_dynamic_shared";
    let (_, f) = function(&ptx(&[(kernel, &[".u64", ".u32", ".u64"], "")]), kernel);
    let (blocks, threads) = (2u32, 128u32);
    let mut found = upload(&[0u8; 64]);
    let mut bytes = 64i32;
    let mut mirrored = upload(&vec![0u32; (blocks * threads) as usize]);
    let shared = threads * 4;
    ok(launch(f, [blocks, 1, 1], [threads, 1, 1], shared, &mut [arg(&mut found), arg(&mut bytes), arg(&mut mirrored)]));
    assert!(download::<u8>(found, 64).iter().all(|&b| b == GARBAGE_BYTE), "fresh shared memory holds 0xCD");
    let got: Vec<u32> = download(mirrored, (blocks * threads) as usize);
    for (i, &value) in got.iter().enumerate() {
        assert_eq!(value, threads - 1 - (i as u32 % threads), "thread {i} reads its mirror's write");
    }
    free(found);
    free(mirrored);
}

#[test]
fn three_dimensional_grids_and_blocks_see_their_indices() {
    context();
    let kernel = "switchyard_emu_test_indices";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], "")]), kernel);
    let (grid, block) = ([2u32, 3, 2], [4u32, 2, 3]);
    let total = (grid.iter().product::<u32>() * block.iter().product::<u32>()) as usize;
    let mut out = upload(&vec![0u32; 4 * total]);
    ok(launch(f, grid, block, 0, &mut [arg(&mut out)]));
    let got: Vec<u32> = download(out, 4 * total);
    let mut linear = 0;
    for (bz, by, bx) in itertools3(grid[2], grid[1], grid[0]) {
        for (tz, ty, tx) in itertools3(block[2], block[1], block[0]) {
            let row = &got[4 * linear..4 * linear + 4];
            assert_eq!(
                row,
                [tx | ty << 10 | tz << 20, bx, by, bz],
                "block ({bx}, {by}, {bz}) thread ({tx}, {ty}, {tz})"
            );
            linear += 1;
        }
    }
    free(out);
}

/// (z, y, x) for x fastest.
fn itertools3(z: u32, y: u32, x: u32) -> impl Iterator<Item = (u32, u32, u32)> {
    (0..z).flat_map(move |k| (0..y).flat_map(move |j| (0..x).map(move |i| (k, j, i))))
}

#[test]
fn a_shuffle_naming_an_exited_lane_fails_the_launch() {
    context();
    let kernel = "switchyard_emu_test_shuffle_after_exit";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], "")]), kernel);
    let mut out = upload(&[0f32; 32]);
    let result = launch(f, [1, 1, 1], [32, 1, 1], 0, &mut [arg(&mut out)]);
    assert_eq!(result, code::LAUNCH_FAILED, "got {}", name(result));
    free(out);
}

#[test]
fn a_deadlock_fails_the_launch_instead_of_hanging() {
    context();
    let kernel = "switchyard_emu_test_deadlock";
    let (_, f) = function(&ptx(&[(kernel, &[".u64"], "")]), kernel);
    let mut out = upload(&[0f32; 64]);
    let result = launch(f, [1, 1, 1], [64, 1, 1], 0, &mut [arg(&mut out)]);
    assert_eq!(result, code::LAUNCH_FAILED, "got {}", name(result));
    // The emulator still works after a failed launch.
    let kernel = "switchyard_emu_test_shuffle";
    let (_, f) = function(&ptx(&[(kernel, &[".u64", ".u64", ".u64"], "")]), kernel);
    let mut input = upload(&[1f32; 32]);
    let (mut sums, mut swapped) = (upload(&[0f32; 32]), upload(&[0f32; 32]));
    ok(launch(f, [1, 1, 1], [32, 1, 1], 0, &mut [arg(&mut input), arg(&mut sums), arg(&mut swapped)]));
    assert!(download::<f32>(sums, 32).iter().all(|&s| s == 32.0));
    for p in [out, input, sums, swapped] {
        free(p);
    }
}

#[test]
fn the_warp_mma_gathers_every_lane_and_scatters_each_fragment() {
    context();
    let kernel = "switchyard_emu_test_warp_mma";
    let (_, f) = function(&ptx(&[(kernel, &[".u64", ".u64", ".u64", ".u64"], "")]), kernel);
    // Small E4M3 codes (exponent fields 6..8, either sign) so every sum is exact whatever the order.
    let code = |i: u32| -> u32 { (0x30 + (i * 37 % 24)) | if i % 3 == 0 { 0x80 } else { 0 } };
    let word = |base: u32| -> u32 { (0..4).fold(0, |w, j| w | code(base + j) << (8 * j)) };
    let a: [[u32; 4]; 32] = std::array::from_fn(|l| [0, 1, 2, 3].map(|r| word(l as u32 * 16 + r * 4)));
    let b: [[u32; 2]; 32] = std::array::from_fn(|l| [0, 1].map(|r| word(1000 + l as u32 * 8 + r * 4)));
    let c: [[f32; 4]; 32] = std::array::from_fn(|l| [0, 1, 2, 3].map(|r| (l * 4 + r) as f32 * 0.5));
    let want = switchyard_cuda_emulator::runtime::warp_mma_m16n8k32_e4m3(&a, &b, &c);
    let flat_a: Vec<u32> = a.concat();
    let flat_b: Vec<u32> = b.concat();
    let flat_c: Vec<f32> = c.concat();
    let (mut a_dev, mut b_dev, mut c_dev) = (upload(&flat_a), upload(&flat_b), upload(&flat_c));
    let mut d_dev = upload(&[0f32; 128]);
    let mut args = [arg(&mut a_dev), arg(&mut b_dev), arg(&mut c_dev), arg(&mut d_dev)];
    ok(launch(f, [1, 1, 1], [32, 1, 1], 0, &mut args));
    assert_eq!(download::<f32>(d_dev, 128), want.concat(), "each lane gets its own D fragment");
    assert!(want.concat().iter().zip(&flat_c).any(|(d, c)| d != c), "the MMA changed the accumulators");
    for p in [a_dev, b_dev, c_dev, d_dev] {
        free(p);
    }
}

#[test]
fn scalar_arguments_arrive_with_their_types() {
    context();
    let kernel = "switchyard_emu_test_scalars";
    let (_, f) = function(&ptx(&[(kernel, &[".u32", ".u32", ".f32", ".u64", ".u64", ".u64"], "")]), kernel);
    let (mut i, mut u, mut x, mut ll, mut ull) = (-7i32, 0xDEAD_BEEFu32, 1.5f32, -1i64 << 40, u64::MAX - 3);
    let mut out = upload(&[0u8; 28]);
    let mut args: [*mut c_void; 6] =
        [arg(&mut i), arg(&mut u), arg(&mut x), arg(&mut ll), arg(&mut ull), arg(&mut out)];
    ok(launch(f, [1, 1, 1], [32, 1, 1], 0, &mut args));
    let got: Vec<u8> = download(out, 28);
    let mut want = Vec::new();
    want.extend(i.to_ne_bytes());
    want.extend(u.to_ne_bytes());
    want.extend(x.to_ne_bytes());
    want.extend(ll.to_ne_bytes());
    want.extend(ull.to_ne_bytes());
    assert_eq!(got, want);
    free(out);
}
