//! Compiles pullgate's own CRI `runtime.v1` message subset (`proto/runtime/v1/cri.proto`) into
//! `$OUT_DIR/runtime.v1.rs`, included by `src/cri/api.rs`. Needs `protoc` (Debian
//! `protobuf-compiler`) on PATH or in `$PROTOC`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/runtime/v1/cri.proto");
    prost_build::Config::new().compile_protos(&["proto/runtime/v1/cri.proto"], &["proto"])?;
    Ok(())
}
