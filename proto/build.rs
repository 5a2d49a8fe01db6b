//! Compiles `switchyard/v1/*.proto` with protox (pure Rust), so building Switchyard needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "communicator.proto",
        "context.proto",
        "control.proto",
        "coordinator.proto",
        "dispatch.proto",
        "generate.proto",
        "store.proto",
    ]
    .map(|f| format!("switchyard/v1/{f}"));
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(&files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // For gRPC reflection: `compile_fds` takes the set as given and does not write it out itself.
    std::fs::write(out_dir.join("switchyard_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure()
        // Payloads stay `bytes::Bytes`: decoding slices the received buffer instead of copying it.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
