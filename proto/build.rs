//! Compiles `academy/v1/*.proto` with protox (pure Rust, no system protoc).

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files =
        ["academy/v1/messages.proto", "academy/v1/exchange.proto", "academy/v1/launcher.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("academy_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".academy.v1.Payload.data").compile_fds(fds)?;
    Ok(())
}
