//! Compiles the emulator's C++: the runtime (cpp/runtime.cpp), one translation unit per kernels/cuda/*.cu
//! (cpp/kernels_*.cpp), the self-test kernels and the warp MMA (cpp/mma.cpp). Always -O2: the
//! kernels are the hot loops of every emulated GPU test, whatever the profile.

use std::path::Path;

fn main() {
    let cpp = Path::new("cpp");
    let kernels = Path::new("../kernels/cuda");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .include(cpp.join("include"))
        .include(kernels)
        .define("SWITCHYARD_CPU_EMULATION", None)
        // CUDA code puns types freely (bytes read as uint4, __half2_raw as __half2), as nvcc allows.
        .flag_if_supported("-fno-strict-aliasing")
        // `#pragma unroll` is nvcc's; g++ warns about it on every loop.
        .flag_if_supported("-Wno-unknown-pragmas")
        // The kernels' float arithmetic must stay IEEE: no contraction into FMAs the source did not ask for.
        .flag_if_supported("-ffp-contract=off")
        .warnings(true);
    let sources = [
        "runtime.cpp",
        "kernels_experts.cpp",
        "kernels_attention.cpp",
        "kernels_dense.cpp",
        "kernels_hopper.cpp",
        "kernels_selftest.cpp",
        "mma.cpp",
    ];
    for source in &sources {
        build.file(cpp.join(source));
    }
    build.compile("switchyard_cuda_emulation");

    println!("cargo:rerun-if-changed=cpp");
    println!("cargo:rerun-if-changed=cpp/include");
    for entry in std::fs::read_dir(cpp)
        .into_iter()
        .flatten()
        .chain(std::fs::read_dir(cpp.join("include")).into_iter().flatten())
        .flatten()
    {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }
    for file in ["experts.cu", "attention.cu", "dense.cu", "hopper.cu"] {
        println!("cargo:rerun-if-changed={}", kernels.join(file).display());
    }
}
