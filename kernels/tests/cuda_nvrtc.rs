//! Every CUDA source of `kernels/cuda/` compiles with NVRTC to PTX for the H100 (`compute_90`; `compute_90a` for the
//! Hopper-only source), through the same
//! function the backend uses at start-up. NVRTC needs no GPU: on a machine without CUDA, `scripts/nvrtc-tools.sh`
//! provides it from PyPI wheels (`eval "$(bash scripts/nvrtc-tools.sh)"`). Where libnvrtc or the CUDA headers are
//! missing the test prints why and passes (it cannot check anything there).

use switchyard_kernels::device::{compile_cuda_source, sources::CUDA_SOURCES};
use switchyard_kernels::KernelError;

#[test]
fn every_cuda_source_compiles_for_sm_90() {
    for source in CUDA_SOURCES {
        let arch = source.arch_on("compute_90").expect("every source runs on an H100");
        match compile_cuda_source(source, &arch) {
            Ok(ptx) => {
                for kernel in source.kernels {
                    assert!(ptx.contains(&format!(".entry {kernel}(")), "{}: no entry {kernel}", source.file);
                }
                println!("{}: {} bytes of PTX for {arch}, kernels {:?}", source.file, ptx.len(), source.kernels);
            }
            Err(skip @ (KernelError::CudaUnavailable { .. } | KernelError::CudaIncludeNotFound { .. })) => {
                println!("SKIPPED: cannot compile CUDA here: {skip} (run `eval \"$(bash scripts/nvrtc-tools.sh)\"`)");
                return;
            }
            Err(error) => panic!("{error}"),
        }
    }
}

#[test]
fn a_broken_source_reports_the_nvrtc_log() {
    const BROKEN: switchyard_kernels::device::sources::CudaSource = switchyard_kernels::device::sources::CudaSource {
        file: "broken.cu",
        text: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }\n",
        kernels: &["broken"],
        only_for: None,
    };
    match compile_cuda_source(&BROKEN, "compute_90") {
        Err(KernelError::CudaCompile { file, log, .. }) => {
            assert_eq!(file, "broken.cu");
            assert!(log.contains("undefined_name"), "{log}");
        }
        Err(skip @ (KernelError::CudaUnavailable { .. } | KernelError::CudaIncludeNotFound { .. })) => {
            println!("SKIPPED: cannot compile CUDA here: {skip}");
        }
        other => panic!("a broken source must fail to compile, got {other:?}"),
    }
}

/// ptxas's resource report for the H100 (NVRTC compiles to SASS for `sm_90` and runs ptxas when asked for a real
/// architecture): registers and spills of every kernel, printed for tuning on the GPU machine. A spill in the streaming
/// GEMM would turn its register accumulators into local-memory traffic, so spills fail the test.
#[test]
fn kernels_do_not_spill_registers_on_sm_90() {
    use std::ffi::{CStr, CString};

    use cudarc::nvrtc::result;
    use switchyard_kernels::device::sources::find_cuda_include;

    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        println!("SKIPPED: libnvrtc not found (run `eval \"$(bash scripts/nvrtc-tools.sh)\"`)");
        return;
    }
    let Ok(include) = find_cuda_include() else {
        println!("SKIPPED: CUDA headers not found (run `eval \"$(bash scripts/nvrtc-tools.sh)\"`)");
        return;
    };
    for source in CUDA_SOURCES {
        let sm = source.arch_on("compute_90").expect("every source runs on an H100").replace("compute", "sm");
        let text = CString::new(source.text).expect("no NUL in sources");
        let name = CString::new(source.file).expect("no NUL in names");
        let program = result::create_program(&text, Some(&name)).expect("nvrtc program");
        let options = [
            "--std=c++17".to_owned(),
            format!("--include-path={}", include.display()),
            format!("--gpu-architecture={sm}"),
            "--ptxas-options=-v".to_owned(),
        ];
        // SAFETY: the program is live until destroyed below; the log is read before that.
        let (compiled, log) = unsafe {
            let compiled = result::compile_program(program, &options);
            let log = result::get_program_log(program).expect("nvrtc log");
            let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
            result::destroy_program(program).expect("destroy program");
            (compiled, log)
        };
        assert!(compiled.is_ok(), "{}: {log}", source.file);
        println!("== {} ({sm}):\n{log}", source.file);
        let spills: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("spill") && !l.contains("0 bytes spill stores, 0 bytes spill loads"))
            .collect();
        assert!(spills.is_empty(), "{}: register spills: {spills:?}", source.file);
    }
}
