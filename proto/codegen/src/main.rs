//! The code in `proto/src/generated/` is what `proto/academy/v1/*.proto`
//! compile to. It is checked in so that crates depending on `academy-proto`
//! (every agent) need no protobuf compiler at build time. This program
//! compiles the contracts again (with protox: no system protoc) and writes
//! the result (`make proto`); its test fails if the checked-in code differs.
//! It does not depend on `academy-proto`, so it runs when that crate does not
//! compile (after a `.proto` change).

use std::path::{Path, PathBuf};

use prost::Message as _;

const FILES: [&str; 6] = [
    "academy/v1/messages.proto",
    "academy/v1/exchange.proto",
    "academy/v1/launcher.proto",
    "academy/v1/clock.proto",
    "academy/v1/peer.proto",
    "academy/v1/blob.proto",
];

/// The generated files, by name.
const GENERATED: [&str; 2] = ["academy.v1.rs", "academy_descriptor.bin"];

/// Compiles the contracts under `root` into `out`: the Rust code and the
/// descriptor set.
fn generate(root: &Path, out: &Path) {
    let fds = protox::compile(FILES.map(|f| root.join(f)), [root]).expect("the contracts compile");
    std::fs::write(out.join("academy_descriptor.bin"), fds.encode_to_vec()).unwrap();
    tonic_prost_build::configure()
        .bytes(".academy.v1.Payload.data")
        .bytes(".academy.v1.PutBlobRequest.data")
        .bytes(".academy.v1.GetBlobResponse.data")
        .bytes(".academy.v1.PutPeerBlobRequest.data")
        .bytes(".academy.v1.GetPeerBlobResponse.data")
        .codec_path("crate::codec::BoundedCodec")
        .out_dir(out)
        .compile_fds(fds)
        .expect("the code generates");
}

/// The `proto/` directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("proto/codegen is in proto/").into()
}

/// Generates into a scratch directory; the generated files that differ from
/// the checked-in ones (written over them when `write`).
fn stale(write: bool) -> Vec<&'static str> {
    let root = root();
    let out = std::env::temp_dir().join(format!("academy-proto-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    generate(&root, &out);
    let mut stale = Vec::new();
    for name in GENERATED {
        let fresh = std::fs::read(out.join(name)).unwrap();
        let checked_in = root.join("src/generated").join(name);
        if std::fs::read(&checked_in).ok().as_ref() != Some(&fresh) {
            if write {
                std::fs::write(&checked_in, &fresh).unwrap();
            }
            stale.push(name);
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
    stale
}

fn main() {
    let written = stale(true);
    println!("proto/src/generated: {} file(s) written {written:?}", written.len());
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_generated_code_matches_the_contracts() {
        let stale = super::stale(false);
        assert!(
            stale.is_empty(),
            "proto/src/generated/{stale:?} no longer match the .proto files: run `make proto` and commit the result"
        );
    }
}
