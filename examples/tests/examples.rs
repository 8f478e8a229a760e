//! The examples run as users run them, each against its embedded exchange-server.

use std::process::Command;

fn run(binary: &str) -> String {
    let out = Command::new(binary).env("RUST_LOG", "warn").output().expect("example starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{binary} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn quickstart_counts_to_42() {
    let out = run(env!("CARGO_BIN_EXE_quickstart"));
    assert!(out.contains("increment(41) -> 42"), "{out}");
    assert!(out.contains("get()         -> 42"), "{out}");
}

#[test]
fn pipeline_reports_every_document_and_the_expected_error() {
    let out = run(env!("CARGO_BIN_EXE_pipeline"));
    assert!(out.contains("analysers found by discovery: 1"), "{out}");
    assert_eq!(out.matches("Report {").count(), 3, "{out}");
    assert!(out.contains("top: Some((\"the\", 2))"), "{out}");
    assert!(out.contains("expected error: String: nothing to analyse"), "{out}");
}
