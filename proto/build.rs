//! Compiles `proto/paramd/v1/paramd.proto` with the pure-Rust `protox`, so the
//! build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/paramd/v1/paramd.proto";
    // tonic-prost-build 0.14 does not print this itself.
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    // For gRPC reflection: what `grpcurl` reads instead of the proto file.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("paramd_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Tensor payloads decode as `bytes::Bytes` slices of the received
        // buffer instead of being copied into a Vec.
        .bytes(".paramd.v1")
        .compile_fds(fds)?;
    Ok(())
}
