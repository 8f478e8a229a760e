//! The `academy-exchange` binary as users run it: configured by env vars,
//! stopped by SIGTERM while a subscriber holds a stream open.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{agent_and_client, message};

use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient};

/// The binary, as the tests below run it.
fn spawn_exchange() -> (std::process::Child, String) {
    common::spawn_exchange(&[("ACADEMY_EXCHANGE_MAX_QUEUED", "2")], &[])
}

fn sigterm(child: &std::process::Child) {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn sigterm_stops_the_server_promptly_despite_open_streams() {
    let (mut child, url) = spawn_exchange();
    let mut rpc = ExchangeServiceClient::connect(url).await.unwrap();
    let (id, client) = agent_and_client(&mut rpc, "t.A").await;

    // The env var limit is in force: the third queued message is refused.
    for i in 0..3 {
        let message = message(&client, &id, pb::message::Body::PingRequest(pb::PingRequest {}));
        let sent = rpc.send(pb::SendRequest { message: Some(message) }).await;
        assert_eq!(sent.is_ok(), i < 2, "message {i}: {sent:?}");
    }

    let _stream =
        rpc.subscribe(pb::SubscribeRequest { mailbox_id: id, ..Default::default() }).await.unwrap();
    sigterm(&child);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "still running 5s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean exit: {status:?}");
}

#[test]
fn bad_configuration_is_refused_with_a_clear_message() {
    for (args, expected) in [
        (&["--listen", "not-an-address"][..], "--listen"),
        (&["--client-cert-principals"][..], "--tls-client-ca"),
        (&["--max-message-bytes", "4194304"][..], "must fit in a delivery"),
        (&["--max-queued", "0"][..], "must be positive"),
        (&["--backend", "redis", "--blob-dir", "/tmp"][..], "--blob-dir is for the memory backend"),
        (
            &["--listen", "127.0.0.1:0", "--blob-dir", "/nonexistent/blobs"][..],
            "blob directory /nonexistent/blobs: cannot keep blobs there",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_academy-exchange")).args(args).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn a_bad_tokens_file_is_refused_naming_the_file_and_line() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "alice 0123456789abcdef\nbob short\n").unwrap();
    let missing = dir.join("missing");
    for (path, expected) in [
        (&file, "line 2: the token of \"bob\" is shorter than 16 characters"),
        (&missing, "cannot read tokens file"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_academy-exchange"))
            .args(["--listen", "127.0.0.1:0", "--tokens-file"])
            .arg(path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected) && stderr.contains(&*path.to_string_lossy()), "{stderr}");
        assert!(!stderr.contains("0123456789abcdef"), "a token leaked: {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// With `--blob-dir`, a blob's bytes go to a file (unlinked at once) rather
/// than the exchange's memory: putting 64 MiB grows its resident memory by
/// much less, nothing shows in the directory, and the bytes read back whole.
#[tokio::test]
async fn blobs_kept_in_a_directory_stay_out_of_memory() {
    use academy_proto::pb::blob_service_client::BlobServiceClient;
    use sha2::{Digest as _, Sha256};
    const MIB: usize = 1 << 20;
    let dir = std::env::temp_dir().join(format!("academy-blobs-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut child, url) = common::spawn_exchange(&[], &["--blob-dir", dir.to_str().unwrap()]);
    let mut rpc = ExchangeServiceClient::connect(url.clone()).await.unwrap();
    let owner = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let owner = owner.into_inner().client_id;
    let mut blobs = BlobServiceClient::connect(url).await.unwrap();
    let chunk = |i: usize| vec![(i % 251) as u8; MIB];
    let before = common::rss(child.id());
    let head = pb::PutBlobRequest { owner, size: 64 * MIB as u64, ..Default::default() };
    let body =
        (0..64).map(move |i| pb::PutBlobRequest { data: chunk(i).into(), ..Default::default() });
    let requests = tokio_stream::iter(std::iter::once(head).chain(body));
    let blob = blobs.put_blob(requests).await.unwrap().into_inner().blob.unwrap();
    let grown = common::rss(child.id()).saturating_sub(before);
    assert!(grown < 32 * MIB as u64, "the exchange grew by {} MiB for a 64 MiB blob", grown >> 20);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "blob files are unlinked");

    let request = pb::GetBlobRequest { key: blob.key.clone(), offset: 0 };
    let mut frames = blobs.get_blob(request).await.unwrap().into_inner();
    let (mut hasher, mut read) = (Sha256::new(), 0);
    while let Some(frame) = frames.message().await.unwrap() {
        hasher.update(&frame.data);
        read += frame.data.len();
    }
    assert_eq!(read, 64 * MIB);
    assert_eq!(hasher.finalize().to_vec(), blob.sha256);
    let deleted = blobs.delete_blob(pb::DeleteBlobRequest { key: blob.key }).await.unwrap();
    assert!(deleted.into_inner().deleted);
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(dir).unwrap();
}
