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

/// The worker logs as the other binaries do: text without colour codes when
/// stderr is not a terminal, and one JSON object per line with
/// `ACADEMY_LOG_FORMAT=json`.
#[test]
fn the_worker_logs_plain_text_or_json_into_a_file() {
    // A launcher that is not there: the worker logs that it cannot join.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for format in ["pretty", "json"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--launcher", &format!("http://{nowhere}")])
            .env("ACADEMY_LOG_FORMAT", format)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("cannot join the launcher"), "{format}: {log}");
        assert!(!log.contains('\u{1b}'), "{format}: colour codes in a file: {log}");
        if format == "json" {
            for line in log.lines() {
                let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
                assert!(parsed["level"].is_string(), "{line}");
            }
        }
    }
}
