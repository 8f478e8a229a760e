//! The manifests as a platform team would check them, offline: each overlay
//! rendered by `kubectl kustomize`, validated against Kubernetes' schemas
//! (the oldest version we support and the newest), and free of violations of
//! the restricted Pod Security Standard and the house rules.

use std::path::{Path, PathBuf};
use std::process::Command;

use academy_deploy::{
    VERSION, cpu_requests_millis, env_of, kubernetes_dir, parse, pod_template, render, validate,
    violations, with_budget,
};
use serde_json::{Value, json};

/// The Kubernetes versions the manifests must be valid for: kind's and the
/// clouds' oldest supported, and the newest `kubernetes-validate` knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// A new folder under the test's scratch folder.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `to` as seen from `from` (both absolute).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to) = (from.canonicalize().unwrap(), to.canonicalize().unwrap());
    let common = from.components().zip(to.components()).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in from.components().skip(common) {
        path.push("..");
    }
    path.extend(to.components().skip(common));
    path
}

/// Renders `dir`, validates it with every supported version, and reads it.
fn checked(dir: &Path) -> Vec<Value> {
    let yaml = render(dir).unwrap();
    static RENDERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RENDERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("rendered-{}-{n}.yaml", std::process::id()));
    std::fs::write(&file, &yaml).unwrap();
    for version in KUBERNETES_VERSIONS {
        validate(&file, version)
            .unwrap_or_else(|e| panic!("{} against {version}: {e}", dir.display()));
    }
    std::fs::remove_file(&file).unwrap();
    parse(&yaml).unwrap()
}

fn overlay(name: &str) -> Vec<Value> {
    checked(&kubernetes_dir().join("overlays").join(name))
}

/// The prod overlay with component `name`, checked.
fn prod_with(name: &str) -> Vec<Value> {
    // kustomize takes other kustomizations by relative path only.
    let dir = scratch_dir(&format!("overlay-{name}"));
    let prod = relative(&dir, &kubernetes_dir().join("overlays/prod"));
    let component = relative(&dir, &kubernetes_dir().join("components").join(name));
    let text = format!("resources: [{}]\ncomponents: [{}]\n", prod.display(), component.display());
    std::fs::write(dir.join("kustomization.yaml"), text).unwrap();
    let objects = checked(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    objects
}

fn assert_clean(objects: &[Value], what: &str) {
    let found = violations(objects);
    assert!(found.is_empty(), "{what}: {} violations:\n{}", found.len(), found.join("\n"));
}

#[test]
fn the_dev_overlay_is_valid_restricted_and_fits_a_laptop() {
    let objects = overlay("dev");
    assert_clean(&objects, "dev");
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert!(!kinds.contains(&"StatefulSet"), "dev runs no Redis: {kinds:?}");
    // A 4-CPU kind cluster gives its system pods about one core.
    let millis = cpu_requests_millis(&objects);
    assert!(millis <= 1000, "dev requests {millis}m of CPU");
    let namespace = objects.iter().find(|o| o["kind"] == "Namespace").unwrap();
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    println!("dev: {} objects, {millis}m CPU requested, 0 violations", objects.len());
}

#[test]
fn the_prod_overlay_is_valid_restricted_durable_and_spread() {
    let objects = overlay("prod");
    assert_clean(&objects, "prod");
    let exchange = pod_template(&objects, "academy-exchange").unwrap();
    let env = env_of(&exchange["spec"]);
    assert_eq!(env.get("ACADEMY_EXCHANGE_BACKEND"), Some(&"redis"));
    assert!(env.contains_key("ACADEMY_EXCHANGE_TLS_CERT"), "prod serves TLS");
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "academy-exchange")
        .unwrap();
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert!(
        !exchange["spec"]["affinity"]["podAntiAffinity"].is_null(),
        "replicas spread over nodes"
    );
    let budgets = with_budget(&objects);
    for name in ["academy-exchange", "academy-worker"] {
        assert!(budgets.contains(name), "{name} has no PodDisruptionBudget: {budgets:?}");
    }
    for name in ["academy-launcher", "academy-worker"] {
        let env = env_of(&pod_template(&objects, name).unwrap()["spec"]);
        let urls: Vec<&&str> = env
            .iter()
            .filter(|(k, _)| k.ends_with("_URL") && !k.contains("REDIS"))
            .map(|(_, v)| v)
            .collect();
        assert!(
            !urls.is_empty() && urls.iter().all(|u| u.starts_with("https://")),
            "{name} talks TLS: {urls:?}"
        );
        assert!(env.contains_key("ACADEMY_TLS_CA"), "{name} trusts the CA");
    }
    let redis = pod_template(&objects, "academy-redis").expect("prod runs Redis");
    assert!(redis["spec"]["containers"][0]["image"].as_str().unwrap().starts_with("redis:7."));
    println!(
        "prod: {} objects, {}m CPU requested, 0 violations",
        objects.len(),
        cpu_requests_millis(&objects)
    );
}

#[test]
fn the_monitoring_component_adds_a_pod_monitor_for_every_metrics_port() {
    let objects = prod_with("monitoring");
    let monitor = objects.iter().find(|o| o["kind"] == "PodMonitor").expect("a PodMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "academy");
    let port = monitor["spec"]["podMetricsEndpoints"][0]["port"].as_str().unwrap();
    let selected = monitor["spec"]["selector"]["matchExpressions"][0]["values"].as_array().unwrap();
    for name in ["academy-exchange", "academy-launcher", "academy-worker"] {
        assert!(selected.iter().any(|v| v == name), "{name} not scraped");
        let pods = pod_template(&objects, name).unwrap();
        let ports = pods["spec"]["containers"][0]["ports"].as_array().unwrap();
        assert!(ports.iter().any(|p| p["name"] == port), "{name} has no port {port}");
    }
}

#[test]
fn the_direct_component_serves_peer_endpoints_on_the_pod_ip_to_the_namespace() {
    let objects = prod_with("direct");
    assert_clean(&objects, "prod with direct delivery");
    let worker = pod_template(&objects, "academy-worker").unwrap();
    let container = &worker["spec"]["containers"][0];
    // (That POD_IP comes before what expands it is one of the house rules.)
    let env = env_of(&worker["spec"]);
    assert_eq!(env.get("ACADEMY_WORKER_DIRECT"), Some(&"$(POD_IP):7000"));
    let help = Command::new(academy_server::testing::binary("worker")).arg("--help").output();
    let help = String::from_utf8_lossy(&help.expect("the worker binary runs").stdout).into_owned();
    assert!(help.contains("[env: ACADEMY_WORKER_DIRECT="), "the worker reads it");
    let ports = container["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == "peer" && p["containerPort"] == 7000), "{ports:?}");
    // The workers' other ports stay closed to everyone but monitoring.
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "academy-peer")
        .expect("a NetworkPolicy for the peer port");
    assert_eq!(policy["metadata"]["namespace"], "academy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "academy-worker"
    );
    let rule = &policy["spec"]["ingress"][0];
    assert_eq!(rule["ports"], json!([{"port": "peer", "protocol": "TCP"}]));
    assert_eq!(rule["from"], json!([{"podSelector": {}}]), "from this namespace only");
}

/// Every `ACADEMY_*` variable a manifest sets is one its binary reads: a
/// misspelt one would be ignored without a word.
#[test]
fn every_variable_the_manifests_set_is_read_by_its_binary() {
    let client = [
        academy_sdk::credentials::TOKEN_ENV,
        academy_sdk::credentials::TLS_CA_ENV,
        academy_sdk::credentials::TLS_CERT_ENV,
        academy_sdk::credentials::TLS_KEY_ENV,
    ];
    let mut checked = 0;
    for name in ["dev", "prod"] {
        let objects = overlay(name);
        for pods in objects.iter().filter_map(|o| o["spec"]["template"]["spec"].as_object()) {
            for container in pods["containers"].as_array().unwrap() {
                let Some(binary) = container["command"][0].as_str() else { continue };
                let path = academy_server::testing::binary(binary);
                let help = Command::new(&path).arg("--help").output();
                let help = help.unwrap_or_else(|e| {
                    panic!("cannot run {} ({e}): build the workspace's binaries", path.display())
                });
                let help = String::from_utf8_lossy(&help.stdout);
                for var in container["env"].as_array().into_iter().flatten() {
                    let var = var["name"].as_str().unwrap();
                    if !var.starts_with("ACADEMY_") || client.contains(&var) {
                        continue;
                    }
                    assert!(
                        help.contains(&format!("[env: {var}")),
                        "{name}: {binary} does not read {var}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} variables checked");
}

/// Puts a flaw into a Deployment.
type Flaw = fn(&mut Value);

/// The checks can fail: each flaw put into the dev overlay is reported, and
/// `kubernetes-validate` refuses a field Kubernetes does not have.
#[test]
fn each_flaw_is_reported() {
    let clean = overlay("dev");
    let index = clean.iter().position(|o| o["kind"] == "Deployment").unwrap();
    let flaws: [(&str, Flaw); 9] = [
        ("capabilities.drop does not contain ALL", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] =
                Value::Array(vec![]);
        }),
        ("runAsNonRoot is not true", |d| {
            d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = false.into();
        }),
        ("seccompProfile.type", |d| {
            d["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"] =
                "Unconfined".into();
        }),
        ("no livenessProbe", |d| {
            d["spec"]["template"]["spec"]["containers"][0]
                .as_object_mut()
                .unwrap()
                .remove("livenessProbe");
        }),
        ("which it does not declare", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
                "admin".into();
        }),
        ("no resources.requests.cpu", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
                .as_object_mut()
                .unwrap()
                .remove("cpu");
        }),
        ("floats", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["image"] = "academy:dev".into()
        }),
        ("which is not there", |d| {
            let env = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut().unwrap();
            env.push(serde_json::json!({"name": "X", "valueFrom": {"secretKeyRef": {"name": "nowhere", "key": "k"}}}));
        }),
        ("hostNetwork is on", |d| d["spec"]["template"]["spec"]["hostNetwork"] = true.into()),
    ];
    for (expected, flaw) in flaws {
        let mut objects = clean.clone();
        flaw(&mut objects[index]);
        let found = violations(&objects);
        assert!(found.iter().any(|v| v.contains(expected)), "{expected:?} not reported: {found:?}");
    }
    // An in-memory exchange scaled out would split its mailboxes.
    let mut objects = clean.clone();
    let exchange = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "academy-exchange")
        .unwrap();
    exchange["spec"]["replicas"] = 2.into();
    assert!(violations(&objects).iter().any(|v| v.contains("one replica")));
    let mut objects = clean;
    objects.iter_mut().for_each(|o| {
        if let Some(labels) = o["metadata"]["labels"].as_object_mut() {
            labels.insert("app.kubernetes.io/version".into(), "9.9.9".into());
        }
    });
    assert!(violations(&objects).iter().any(|v| v.contains(VERSION)));
    let mut objects = overlay("dev");
    let index = objects.iter().position(|o| o["kind"] == "Deployment").unwrap();
    objects[index]["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = json!({});
    let file =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-{}.json", std::process::id()));
    std::fs::write(&file, objects[index].to_string()).unwrap();
    let refused = validate(&file, KUBERNETES_VERSIONS[1]);
    std::fs::remove_file(&file).unwrap();
    assert!(refused.is_err_and(|e| e.contains("livenessProbes")), "an unknown field passed");
}
