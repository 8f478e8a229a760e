//! The image, built and run without a registry: `deploy/image.sh` packages
//! this build's binaries with buildah, and `podman kube play` runs the dev
//! overlay's Deployments from it; the pods must come up ready and serve a
//! call to an agent launched through the launcher.
//!
//! What `kube play` cannot do is adapted here, and only that: it runs no
//! Services, so the pods share the host's network (on loopback, on free
//! ports); podman 4.3 mounts a Secret's data still base64-encoded and
//! cannot read a Secret into an environment variable, so the Secret's data
//! is mounted from a ConfigMap and the token put in the variable as text. It
//! skips
//! NetworkPolicies and probes: the schema checks (tests/manifests.rs) cover
//! those.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use academy_deploy::{VERSION, kubernetes_dir, parse, render};
use academy_examples::behaviours::WordStats;
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::launcher::Launcher;
use academy_sdk::{Credentials, Manager};
use academy_server::testing::{binary, free_port, get};
use serde_json::{Value, json};

/// Podman and buildah with their own storage under the test's scratch
/// folder, so the test neither sees nor touches the machine's images.
struct Podman {
    root: PathBuf,
    conf: PathBuf,
    storage: PathBuf,
}

impl Podman {
    fn new() -> Self {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("podman");
        std::fs::create_dir_all(&root).unwrap();
        let storage = root.join("storage.conf");
        let text = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            root.display()
        );
        std::fs::write(&storage, text).unwrap();
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("podman/containers.conf");
        Self { root, conf, storage }
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("CONTAINERS_CONF", &self.conf).env("CONTAINERS_STORAGE_CONF", &self.storage);
        command
    }

    /// Runs podman with `args`; its output, or a panic saying what failed.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command("podman").args(args).output();
        let out =
            out.unwrap_or_else(|e| panic!("cannot run podman ({e}): `make deps` installs it"));
        assert!(
            out.status.success(),
            "podman {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// What `kube play` started, taken down (and logged) however the test ends.
struct Played<'a> {
    podman: &'a Podman,
    file: PathBuf,
}

impl Drop for Played<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let names = self.podman.run(&["ps", "-a", "--format", "{{.Names}}"]);
            for name in names.lines().filter(|n| n.starts_with("academy-")) {
                let out = self.podman.command("podman").args(["logs", name]).output().unwrap();
                eprintln!("--- {name}\n{}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let file = self.file.to_str().unwrap();
        let _ = self.podman.command("podman").args(["kube", "down", file]).output();
    }
}

/// Sets (or adds) `name` to `value` in a container's environment.
fn set_env(container: &mut Value, name: &str, value: &str) {
    let env = container["env"].as_array_mut().unwrap();
    env.retain(|v| v["name"] != name);
    env.push(json!({"name": name, "value": value}));
}

/// The dev overlay, adapted to `kube play` as the module says, on `ports`.
fn for_kube_play(objects: &mut [Value], ports: &Ports) {
    let secrets: Vec<Value> = objects.iter().filter(|o| o["kind"] == "Secret").cloned().collect();
    for object in objects.iter_mut().filter(|o| o["kind"] == "Secret") {
        let data = object.as_object_mut().unwrap().remove("stringData").unwrap();
        *object = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": object["metadata"], "data": data});
    }
    for object in objects.iter_mut().filter(|o| o["kind"] == "Deployment") {
        object["spec"]["replicas"] = 1.into();
        let spec = &mut object["spec"]["template"]["spec"];
        spec["hostNetwork"] = true.into();
        for volume in spec["volumes"].as_array_mut().into_iter().flatten() {
            if let Some(secret) = volume.as_object_mut().unwrap().remove("secret") {
                let name = secret["secretName"].clone();
                volume["configMap"] = json!({"name": name, "items": secret["items"]});
            }
        }
        let container = &mut spec["containers"][0];
        container.as_object_mut().unwrap().remove("ports");
        let from_secrets: Vec<(String, String)> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| {
                let key_ref = &v["valueFrom"]["secretKeyRef"];
                let secret = secrets.iter().find(|s| s["metadata"]["name"] == key_ref["name"])?;
                let value = secret["stringData"][key_ref["key"].as_str()?].as_str()?;
                Some((v["name"].as_str()?.to_owned(), value.to_owned()))
            })
            .collect();
        for (name, value) in from_secrets {
            set_env(container, &name, &value);
        }
        let local = |port: u16| format!("127.0.0.1:{port}");
        match container["name"].as_str().unwrap() {
            "exchange" => {
                set_env(container, "ACADEMY_EXCHANGE_LISTEN", &local(ports.exchange));
                set_env(
                    container,
                    "ACADEMY_EXCHANGE_METRICS_LISTEN",
                    &local(ports.exchange_metrics),
                );
            }
            "launcher" => {
                set_env(container, "ACADEMY_LAUNCHER_LISTEN", &local(ports.launcher));
                set_env(
                    container,
                    "ACADEMY_LAUNCHER_METRICS_LISTEN",
                    &local(ports.launcher_metrics),
                );
                set_env(
                    container,
                    "ACADEMY_EXCHANGE_URL",
                    &format!("http://{}", local(ports.exchange)),
                );
            }
            "worker" => {
                set_env(container, "ACADEMY_WORKER_METRICS_LISTEN", &local(ports.worker_metrics));
                set_env(
                    container,
                    "ACADEMY_LAUNCHER_URL",
                    &format!("http://{}", local(ports.launcher)),
                );
            }
            other => panic!("a container the test does not know: {other}"),
        }
    }
}

struct Ports {
    exchange: u16,
    exchange_metrics: u16,
    launcher: u16,
    launcher_metrics: u16,
    worker_metrics: u16,
}

/// Whether `GET path` on `port` answers 200.
fn ok(port: u16, path: &str) -> bool {
    get(([127, 0, 0, 1], port).into(), path).is_ok_and(|(status, _)| status.ends_with("200 OK"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_dev_overlay_and_serves_a_call() {
    let podman = Podman::new();
    let bin_dir = binary("worker").parent().expect("a folder").to_owned();
    let tag = format!("academy:{VERSION}");
    let started = Instant::now();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("image.sh");
    let built = podman.command(&script).arg(&bin_dir).arg(&tag).output().unwrap();
    assert!(built.status.success(), "image.sh: {}", String::from_utf8_lossy(&built.stderr));
    let images = podman.run(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}"]);
    podman.run(&["image", "prune", "--force"]);
    println!("built in {:?}: {}", started.elapsed(), images.lines().next().unwrap_or_default());

    let ports = Ports {
        exchange: free_port(),
        exchange_metrics: free_port(),
        launcher: free_port(),
        launcher_metrics: free_port(),
        worker_metrics: free_port(),
    };
    let mut objects = parse(&render(&kubernetes_dir().join("overlays/dev")).unwrap()).unwrap();
    // The dev overlay's token of user alice.
    let tokens = objects.iter().find(|o| o["metadata"]["name"] == "academy-tokens").unwrap();
    let alice = tokens["stringData"]["tokens"]
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("alice "))
        .unwrap()
        .to_owned();
    for_kube_play(&mut objects, &ports);
    let file = podman.root.join("dev.yaml");
    let documents: Vec<String> = objects.iter().map(Value::to_string).collect();
    std::fs::write(&file, documents.join("\n---\n")).unwrap();
    let played = Played { podman: &podman, file: file.clone() };
    podman.run(&["kube", "play", file.to_str().unwrap()]);

    // Each pod's /readyz, as the kubelet would ask it: the worker is ready
    // once it has joined the launcher.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (pod, port) in [
        ("exchange", ports.exchange_metrics),
        ("launcher", ports.launcher_metrics),
        ("worker", ports.worker_metrics),
    ] {
        while !ok(port, "/readyz") {
            assert!(Instant::now() < deadline, "the {pod} pod is not ready after 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(ok(port, "/livez"), "{pod} /livez");
    }
    println!("pods ready {:?} after the build", started.elapsed());

    // A user with the dev overlay's token launches an agent and calls it.
    let credentials = Credentials::bearer(&alice).unwrap();
    let exchange_url = format!("http://127.0.0.1:{}", ports.exchange);
    let launcher_url = format!("http://127.0.0.1:{}", ports.launcher);
    let exchange = GrpcExchange::connect_with(exchange_url, &credentials).await.unwrap();
    let manager = Manager::new(Arc::new(exchange)).await.unwrap();
    let launcher = Launcher::connect_with(&launcher_url, &credentials).await.unwrap();
    let agent = manager
        .launch_remote::<WordStats>(&launcher, &json!({}), Default::default())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    let stats = agent.analyse("one two three".into()).await.unwrap();
    assert_eq!(stats.words, 3);
    // Without a token, the exchange in the pod refuses.
    let anonymous = GrpcExchange::connect_with(
        format!("http://127.0.0.1:{}", ports.exchange),
        &Credentials::none(),
    )
    .await
    .unwrap();
    assert!(Manager::new(Arc::new(anonymous)).await.is_err(), "a call without a token was served");
    println!("an agent in the worker pod answered after {:?}", started.elapsed());
    drop(played);
}
