//! The emulated `mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32` against a plain 16x32 by 32x8 product.
//!
//! The test places each matrix element into the warp's registers with the PTX ISA's fragment layout for m16n8k32
//! (section "Matrix Fragments for mma.m16n8k32", .e4m3 rows), written here in the inverse direction, element ->
//! (lane, register, byte), from the documented formulas (groupID = %laneid >> 2, threadID_in_group = %laneid % 4):
//! - A (16 x 32, row): row = groupID (+ 8 for a4..a7 and a12..a15), col = threadID_in_group * 4 + (i & 3)
//!   (+ 16 for i >= 8); so element (r, c) sits in lane (r % 8) * 4 + (c % 16) / 4, register (r / 8) + 2 * (c / 16),
//!   byte c % 4.
//! - B (32 x 8, col): row = threadID_in_group * 4 + (i & 3) (+ 16 for i >= 4), col = groupID; so element (k, n) sits
//!   in lane n * 4 + (k % 16) / 4, register k / 16, byte k % 4.
//! - C, D (16 x 8): row = groupID (+ 8 for c2, c3), col = threadID_in_group * 2 + (i & 1); so element (r, n) sits in
//!   lane (r % 8) * 4 + n / 2, register 2 * (r / 8) + n % 2.

// Linked for the C++ objects its build compiles (cpp/mma.cpp).
use switchyard_cuda_emulator::runtime::{e4m3_to_f32, warp_mma_m16n8k32_e4m3};

/// (lane, register, byte) of A's element (row, col).
fn a_slot(row: usize, col: usize) -> (usize, usize, usize) {
    ((row % 8) * 4 + (col % 16) / 4, row / 8 + 2 * (col / 16), col % 4)
}

/// (lane, register, byte) of B's element (k, n).
fn b_slot(k: usize, n: usize) -> (usize, usize, usize) {
    (n * 4 + (k % 16) / 4, k / 16, k % 4)
}

/// (lane, register) of C's or D's element (row, n).
fn c_slot(row: usize, n: usize) -> (usize, usize) {
    ((row % 8) * 4 + n / 2, 2 * (row / 8) + n % 2)
}

struct Fragments {
    a: [[u32; 4]; 32],
    b: [[u32; 2]; 32],
    c: [[f32; 4]; 32],
}

fn pack(a: &[[u8; 32]; 16], b: &[[u8; 8]; 32], c: &[[f32; 8]; 16]) -> Fragments {
    let mut f = Fragments { a: [[0; 4]; 32], b: [[0; 2]; 32], c: [[0.0; 4]; 32] };
    for (row, codes) in a.iter().enumerate() {
        for (col, &code) in codes.iter().enumerate() {
            let (lane, reg, byte) = a_slot(row, col);
            f.a[lane][reg] |= u32::from(code) << (8 * byte);
        }
    }
    for (k, codes) in b.iter().enumerate() {
        for (n, &code) in codes.iter().enumerate() {
            let (lane, reg, byte) = b_slot(k, n);
            f.b[lane][reg] |= u32::from(code) << (8 * byte);
        }
    }
    for (row, values) in c.iter().enumerate() {
        for (n, &value) in values.iter().enumerate() {
            let (lane, reg) = c_slot(row, n);
            f.c[lane][reg] = value;
        }
    }
    f
}

fn run(f: &Fragments) -> [[f32; 8]; 16] {
    let d = warp_mma_m16n8k32_e4m3(&f.a, &f.b, &f.c);
    let mut out = [[0f32; 8]; 16];
    for (row, values) in out.iter_mut().enumerate() {
        for (n, value) in values.iter_mut().enumerate() {
            let (lane, reg) = c_slot(row, n);
            *value = d[lane][reg];
        }
    }
    out
}

/// OCP E4M3, written from the format's definition (bias 7, 3 mantissa bits, S.1111.111 NaN, no infinities).
fn e4m3(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exponent, mantissa) = (i32::from((code >> 3) & 0xF), f64::from(code & 7));
    if code & 0x7F == 0x7F {
        return f64::NAN;
    }
    if exponent == 0 {
        sign * mantissa / 8.0 * 2f64.powi(-6)
    } else {
        sign * (1.0 + mantissa / 8.0) * 2f64.powi(exponent - 7)
    }
}

#[test]
fn fragment_slots_cover_every_register_byte_once() {
    let mut a_seen = [[[false; 4]; 4]; 32];
    for row in 0..16 {
        for col in 0..32 {
            let (lane, reg, byte) = a_slot(row, col);
            assert!(!a_seen[lane][reg][byte], "A ({row}, {col}) collides");
            a_seen[lane][reg][byte] = true;
        }
    }
    let mut b_seen = [[[false; 4]; 2]; 32];
    for k in 0..32 {
        for n in 0..8 {
            let (lane, reg, byte) = b_slot(k, n);
            assert!(!b_seen[lane][reg][byte], "B ({k}, {n}) collides");
            b_seen[lane][reg][byte] = true;
        }
    }
    let mut c_seen = [[false; 4]; 32];
    for row in 0..16 {
        for n in 0..8 {
            let (lane, reg) = c_slot(row, n);
            assert!(!c_seen[lane][reg]);
            c_seen[lane][reg] = true;
        }
    }
}

#[test]
fn documented_examples_of_the_layout() {
    // Spot values read off the formulas: lane 5 is groupID 1, threadID_in_group 1.
    assert_eq!(a_slot(1, 4), (5, 0, 0), "a0 of lane 5: row 1, col 4");
    assert_eq!(a_slot(9, 7), (5, 1, 3), "a7 of lane 5: row 9, col 7");
    assert_eq!(a_slot(1, 20), (5, 2, 0), "a8 of lane 5: row 1, col 20");
    assert_eq!(a_slot(9, 23), (5, 3, 3), "a15 of lane 5: row 9, col 23");
    assert_eq!(b_slot(4, 1), (5, 0, 0), "b0 of lane 5: row 4, col 1");
    assert_eq!(b_slot(23, 1), (5, 1, 3), "b7 of lane 5: row 23, col 1");
    assert_eq!(c_slot(1, 2), (5, 0), "c0 of lane 5: row 1, col 2");
    assert_eq!(c_slot(9, 3), (5, 3), "c3 of lane 5: row 9, col 3");
}

#[test]
fn one_hot_products_land_on_the_right_element() {
    let one = 0x38u8; // E4M3 1.0
    for (r, c, j) in [(0, 0, 0), (15, 31, 7), (3, 17, 5), (8, 5, 2), (12, 28, 1), (7, 16, 6), (9, 3, 0)] {
        let mut a = [[0u8; 32]; 16];
        let mut b = [[0u8; 8]; 32];
        a[r][c] = one;
        b[c][j] = 0x40; // 2.0
        let d = run(&pack(&a, &b, &[[0.0; 8]; 16]));
        for (row, values) in d.iter().enumerate() {
            for (n, &value) in values.iter().enumerate() {
                let want = if (row, n) == (r, j) { 2.0 } else { 0.0 };
                assert_eq!(value, want, "A[{r}][{c}] * B[{c}][{j}]: D[{row}][{n}]");
            }
        }
    }
}

#[test]
fn matches_the_plain_product_plus_accumulator() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20 {
        let mut a = [[0u8; 32]; 16];
        let mut b = [[0u8; 8]; 32];
        let mut c = [[0f32; 8]; 16];
        // Codes without NaN; all magnitudes including subnormals and 448.
        a.iter_mut().flatten().for_each(|v| *v = (next() as u8) & 0xFE);
        b.iter_mut().flatten().for_each(|v| *v = ((next() as u8) % 0x7F) | ((next() as u8) & 0x80));
        c.iter_mut().flatten().for_each(|v| *v = (next() % 2001) as f32 / 8.0 - 125.0);
        let d = run(&pack(&a, &b, &c));
        for row in 0..16 {
            for n in 0..8 {
                let terms: Vec<f64> = (0..32).map(|k| e4m3(a[row][k]) * e4m3(b[k][n])).collect();
                let want = f64::from(c[row][n]) + terms.iter().sum::<f64>();
                // f32 accumulation of 33 terms: a few ulps of the largest partial sums.
                let scale = f64::from(c[row][n]).abs() + terms.iter().map(|t| t.abs()).sum::<f64>();
                let error = (f64::from(d[row][n]) - want).abs();
                assert!(error <= scale * 4e-6, "D[{row}][{n}] = {}, want {want}", d[row][n]);
            }
        }
    }
}

#[test]
fn exact_sums_are_exact_and_nan_propagates() {
    // Small integers: every partial sum is exact in f32.
    let mut a = [[0u8; 32]; 16];
    let mut b = [[0u8; 8]; 32];
    for (row, codes) in a.iter_mut().enumerate() {
        for (col, code) in codes.iter_mut().enumerate() {
            *code = [0x38, 0x40, 0x44, 0xB8][(row + col) % 4]; // 1, 2, 3, -1
        }
    }
    for (k, codes) in b.iter_mut().enumerate() {
        for (n, code) in codes.iter_mut().enumerate() {
            *code = [0x38, 0xC0, 0x48][(k * 3 + n) % 3]; // 1, -2, 4
        }
    }
    let c: [[f32; 8]; 16] = std::array::from_fn(|row| std::array::from_fn(|n| (row * 8 + n) as f32));
    let d = run(&pack(&a, &b, &c));
    for row in 0..16 {
        for n in 0..8 {
            let want = f64::from(c[row][n]) + (0..32).map(|k| e4m3(a[row][k]) * e4m3(b[k][n])).sum::<f64>();
            assert_eq!(f64::from(d[row][n]), want, "D[{row}][{n}]");
        }
    }
    a[4][9] = 0x7F;
    let d = run(&pack(&a, &b, &c));
    assert!(d[4].iter().all(|v| v.is_nan()), "a NaN in row 4 of A poisons row 4 of D");
    assert!(d[5].iter().all(|v| !v.is_nan()));
}

#[test]
fn e4m3_decoding_is_exact_for_every_code() {
    for code in 0..=255u8 {
        let got = f64::from(e4m3_to_f32(code));
        let want = e4m3(code);
        assert!(got == want || (got.is_nan() && want.is_nan()), "code {code:#04x}: {got} != {want}");
    }
}
