//! Scenario (g): payloads larger than a message, by reference through the
//! exchange's blob store (docs/design.md, "Blobs"): a 1 GiB argument sent
//! from a file through an exchange keeping blobs in files (`--blob-dir`),
//! with the resident memory of both processes sampled meanwhile; and a
//! 100 MiB argument with a 100 MiB result in one call.

use std::time::{Duration, Instant};

use academy_sdk::blob::Blob;
use academy_sdk::{ActionError, Manager, behaviour};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

const MIB: usize = 1 << 20;

struct Chunked;

#[behaviour(name = "bench.Chunked")]
impl Chunked {
    /// The SHA-256 of a blob, read a chunk at a time.
    #[action]
    async fn digest(&self, data: Blob) -> Result<Vec<u8>, ActionError> {
        let mut chunks = data.chunks().await.map_err(|e| ActionError::internal(e.to_string()))?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = chunks.next().await {
            hasher.update(&chunk.map_err(|e| ActionError::internal(e.to_string()))?);
        }
        Ok(hasher.finalize().to_vec())
    }

    /// The same text back (by reference when large: the caller's and the
    /// agent's thresholds decide).
    #[action]
    async fn echo(&self, text: String) -> String {
        text
    }

    /// A blob of the agent's with the same bytes.
    #[action]
    async fn copy(&self, data: Blob) -> Result<Blob, ActionError> {
        let bytes = data.bytes().await.map_err(|e| ActionError::internal(e.to_string()))?;
        let size = bytes.len() as u64;
        academy_sdk::blob::put(std::io::Cursor::new(bytes), size)
            .await
            .map_err(|e| ActionError::internal(e.to_string()))
    }
}

/// The highest resident memory each of `pids` reached while it ran, in
/// bytes, sampled every 10 ms.
fn sample_peaks(
    pids: Vec<u32>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Vec<u64>>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut peaks = vec![0; pids.len()];
        loop {
            for (peak, pid) in peaks.iter_mut().zip(&pids) {
                *peak = (*peak).max(super::rss(*pid).unwrap_or(0));
            }
            tokio::select! {
                _ = &mut stopped => return peaks,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    });
    (stop, task)
}

pub(crate) async fn measure(giant: usize) -> anyhow::Result<Vec<String>> {
    let dir = std::env::temp_dir().join(format!("academy-bench-blobs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exchange =
        super::spawn_server(&["serve-exchange", "--blob-dir", dir.to_str().unwrap_or(".")]).await?;
    let url = format!("http://{}", exchange.addr);
    let manager = Manager::connect(&url).await?;
    let agent = manager.launch(Chunked).await?;
    let mut rows = Vec::new();

    // The file, written a chunk at a time; its digest on the way.
    let path = dir.join("giant");
    let mut file = tokio::fs::File::create(&path).await?;
    let mut hasher = Sha256::new();
    for i in 0..giant / MIB {
        let chunk = vec![(i % 251) as u8; MIB];
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    drop(file);
    let expected = hasher.finalize().to_vec();

    let pids = vec![exchange.child.id().unwrap_or(0), std::process::id()];
    let before: Vec<u64> = pids.iter().map(|p| super::rss(*p).unwrap_or(0)).collect();
    let (stop, peaks) = sample_peaks(pids);
    let started = Instant::now();
    let blob = manager.put_file(&path).await?;
    let put = started.elapsed();
    let started = Instant::now();
    let digest = agent.digest(blob.clone()).await?;
    let read = started.elapsed();
    let _ = stop.send(());
    let peaks = peaks.await?;
    anyhow::ensure!(digest == expected, "the agent read other bytes than the file's");
    blob.delete().await?;
    std::fs::remove_file(&path)?;
    let rate = |bytes: usize, took: Duration| bytes as f64 / took.as_secs_f64() / 1e6;
    rows.push(format!(
        "| (g) {} MiB argument from a file (`--blob-dir` exchange): put / read by the agent | {:.0} / {:.0} MB/s |",
        giant / MIB,
        rate(giant, put),
        rate(giant, read)
    ));
    let grown: Vec<u64> =
        peaks.iter().zip(&before).map(|(p, b)| p.saturating_sub(*b) >> 20).collect();
    rows.push(format!(
        "| (g) resident memory grown meanwhile: exchange / client and agent | {} MiB / {} MiB |",
        grown[0], grown[1]
    ));

    // 100 MiB each way in one call.
    let data: Vec<u8> = (0..100 * MIB).map(|i| (i % 253) as u8).collect();
    let started = Instant::now();
    let argument = manager.put_blob(std::io::Cursor::new(data), 100 * MIB as u64).await?;
    let result = agent.copy(argument.clone()).await?;
    let back = result.bytes().await?;
    let took = started.elapsed();
    anyhow::ensure!(back.len() == 100 * MIB, "the result has {} bytes", back.len());
    argument.delete().await?;
    result.delete().await?;
    rows.push(format!(
        "| (g) 100 MiB argument + 100 MiB result in one call (`Blob`s) | {:.0} MB/s ({:.2} s) |",
        rate(200 * MIB, took),
        took.as_secs_f64()
    ));
    manager.close().await?;

    // The same, as plain values between processes on one node sharing a
    // directory: each side writes a file, the other reads it.
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared)?;
    let manager = Manager::connect(&url).await?.with_blob_dir(&shared);
    let config = academy_sdk::AgentConfig { blob_dir: Some(shared.clone()), ..Default::default() };
    let options = academy_sdk::LaunchOptions { config, ..Default::default() };
    let agent = manager.launch_with(Chunked, options).await?;
    let text = "x".repeat(100 * MIB);
    let started = Instant::now();
    let back = agent.echo(text).await?;
    let took = started.elapsed();
    anyhow::ensure!(back.len() == 100 * MIB, "the result has {} bytes", back.len());
    rows.push(format!(
        "| (g) the same as a plain `String` each way, files in a directory shared on the node | {:.0} MB/s ({:.2} s) |",
        rate(200 * MIB, took),
        took.as_secs_f64()
    ));
    manager.close().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(rows)
}
