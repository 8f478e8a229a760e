//! The code in `src/generated/` is what `academy/v1/*.proto` compile to.
//! It is checked in so that crates depending on `academy-proto` (every agent)
//! need no protobuf compiler at build time; this test compiles the contracts
//! again (with protox: no system protoc) and fails if anything differs.
//! After changing a `.proto` file: `make proto` (this test with
//! `ACADEMY_REGENERATE=1`) writes the new code.

use std::path::{Path, PathBuf};

use prost::Message as _;

const FILES: [&str; 3] =
    ["academy/v1/messages.proto", "academy/v1/exchange.proto", "academy/v1/launcher.proto"];

/// Compiles the contracts into `out`: the Rust code and the descriptor set.
fn generate(root: &Path, out: &Path) {
    let fds = protox::compile(FILES.map(|f| root.join(f)), [root]).expect("the contracts compile");
    std::fs::write(out.join("academy_descriptor.bin"), fds.encode_to_vec()).unwrap();
    tonic_prost_build::configure()
        .bytes(".academy.v1.Payload.data")
        .out_dir(out)
        .compile_fds(fds)
        .expect("the code generates");
}

#[test]
fn generated_code_matches_the_contracts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("academy-proto-generated");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    generate(root, &out);
    let regenerate = std::env::var_os("ACADEMY_REGENERATE").is_some();
    let mut stale = Vec::new();
    for name in ["academy.v1.rs", "academy_descriptor.bin"] {
        let fresh = std::fs::read(out.join(name)).unwrap();
        let checked_in = root.join("src/generated").join(name);
        if std::fs::read(&checked_in).ok().as_ref() != Some(&fresh) {
            if regenerate {
                std::fs::write(&checked_in, &fresh).unwrap();
            } else {
                stale.push(name);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "src/generated/{stale:?} no longer match the .proto files: run `make proto` and commit the result"
    );
}
