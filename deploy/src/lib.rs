//! Academy's Kubernetes manifests (`deploy/kubernetes`) and what they must
//! pass: rendered by `kubectl kustomize`, valid for `kubernetes-validate`, and
//! free of what a platform team refuses ([`violations`]): pods outside the
//! restricted Pod Security Standard, containers without probes or resources,
//! floating images, references to objects that are not there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `deploy/kubernetes` of this checkout.
pub fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kubernetes")
}

/// The release the manifests deploy: the workspace's version, which is also
/// the tag `make image` gives the image.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs `command`; its standard output, or why it failed (naming `what` and
/// how to install it when it is missing).
fn run(command: &mut Command, what: &str) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("cannot run {what} ({e}): `make deps` installs it"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{what} printed something not UTF-8: {e}"))
}

/// The manifests of the kustomization in `dir`, as `kubectl kustomize`
/// renders them (YAML).
pub fn render(dir: &Path) -> Result<String, String> {
    run(Command::new("kubectl").arg("kustomize").arg(dir), "kubectl kustomize")
}

/// The objects of a multi-document YAML text (read by PyYAML, which
/// `kubernetes-validate` brings).
pub fn parse(yaml: &str) -> Result<Vec<Value>, String> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(yaml.as_bytes())
        .map_err(|e| format!("cannot feed python3: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("cannot read the YAML: {}", String::from_utf8_lossy(&out.stderr)));
    }
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(objects)) => Ok(objects),
        Ok(_) => Err("the YAML is not a list of documents".into()),
        Err(e) => Err(format!("cannot read python3's JSON: {e}")),
    }
}

/// Validates the manifests in `file` against Kubernetes `version`'s schemas
/// (`kubernetes-validate --strict`: unknown fields are errors). Kinds it has
/// no schema for (custom resources) are left to the caller.
pub fn validate(file: &Path, version: &str) -> Result<(), String> {
    run(
        Command::new("kubernetes-validate").args(["--strict", "--quiet", "-k", version]).arg(file),
        "kubernetes-validate",
    )
    .map(drop)
}

/// A workload's pod template and what owns it.
struct Pods<'a> {
    owner: String,
    object: &'a Value,
    template: &'a Value,
}

fn name_of(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    format!("{kind}/{name}")
}

fn workloads(objects: &[Value]) -> Vec<Pods<'_>> {
    objects
        .iter()
        .filter_map(|object| {
            let template = match object["kind"].as_str()? {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                    &object["spec"]["template"]
                }
                "CronJob" => &object["spec"]["jobTemplate"]["spec"]["template"],
                "Pod" => object,
                _ => return None,
            };
            Some(Pods { owner: name_of(object), object, template })
        })
        .collect()
}

fn containers(pod_spec: &Value) -> impl Iterator<Item = &Value> {
    let list = |key| pod_spec[key].as_array().into_iter().flatten();
    list("initContainers").chain(list("containers"))
}

fn labels(value: &Value) -> BTreeMap<&str, &str> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .collect()
}

/// Whether every label of `selector` (matchLabels, or a plain map) is in `labels`.
fn selects(selector: &Value, target: &BTreeMap<&str, &str>) -> bool {
    let wanted = labels(selector);
    !wanted.is_empty() && wanted.iter().all(|(k, v)| target.get(k) == Some(v))
}

/// Kinds that live outside namespaces.
const CLUSTER_SCOPED: [&str; 7] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
];

/// Volume types the restricted profile allows.
const ALLOWED_VOLUMES: [&str; 8] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// Everything in `objects` a platform team would refuse, one line each:
/// - the restricted Pod Security Standard: no host namespaces, ports or
///   paths; non-root; no privilege escalation; every capability dropped
///   (`NET_BIND_SERVICE` may be added back); a RuntimeDefault or Localhost
///   seccomp profile;
/// - every container with a startup, readiness and liveness probe, on a port
///   it declares; CPU and memory requests and a memory limit; a read-only
///   root file system; no service-account token mounted;
/// - images by an explicit tag, never `latest` or `dev`, Academy's at
///   [`VERSION`];
/// - `app.kubernetes.io/name`, `part-of` and `version` labels on every
///   object, a namespace on every namespaced one, selectors that select
///   their own pods, Services that select a
///   workload that has their target ports, Secrets and ConfigMaps that exist,
///   `$(VAR)` only of variables defined before;
/// - an exchange that keeps mailboxes in memory runs one replica, recreated
///   (two would each keep mailboxes of their own).
pub fn violations(objects: &[Value]) -> Vec<String> {
    let mut found = Vec::new();
    let mut refuse = |owner: &str, what: String| found.push(format!("{owner}: {what}"));
    let present: BTreeSet<(String, String)> = objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_owned(),
                o["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for object in objects {
        let owner = name_of(object);
        let object_labels = labels(&object["metadata"]["labels"]);
        for key in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            if !object_labels.contains_key(key) {
                refuse(&owner, format!("no label {key}"));
            }
        }
        if object_labels.get("app.kubernetes.io/version") != Some(&VERSION) {
            refuse(&owner, format!("label app.kubernetes.io/version is not {VERSION}"));
        }
        if !CLUSTER_SCOPED.contains(&object["kind"].as_str().unwrap_or_default())
            && object["metadata"]["namespace"].as_str().is_none_or(str::is_empty)
        {
            refuse(&owner, "no namespace: it would land in the user's current one".into());
        }
    }
    let workloads = workloads(objects);
    for Pods { owner, object, template } in &workloads {
        let owner = owner.as_str();
        let spec = &template["spec"];
        let pod_labels = labels(&template["metadata"]["labels"]);
        for key in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
            if !pod_labels.contains_key(key) {
                refuse(owner, format!("pods have no label {key}"));
            }
        }
        if object["kind"] != "Pod"
            && !selects(&object["spec"]["selector"]["matchLabels"], &pod_labels)
        {
            refuse(owner, "its selector does not select its own pods".into());
        }
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            if spec[host] == true {
                refuse(owner, format!("{host} is on"));
            }
        }
        if spec["automountServiceAccountToken"] != false {
            refuse(owner, "automountServiceAccountToken is not false".into());
        }
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let name = volume["name"].as_str().unwrap_or("?");
            let kind = volume
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k.as_str())
                .find(|k| *k != "name");
            match kind {
                Some(kind) if ALLOWED_VOLUMES.contains(&kind) => {}
                other => refuse(
                    owner,
                    format!(
                        "volume {name} is of a type the restricted profile refuses ({other:?})"
                    ),
                ),
            }
            if let Some(secret) = volume["secret"]["secretName"].as_str()
                && !present.contains(&("Secret".into(), secret.into()))
            {
                refuse(owner, format!("volume {name} needs Secret {secret}, which is not there"));
            }
            if let Some(map) = volume["configMap"]["name"].as_str()
                && !present.contains(&("ConfigMap".into(), map.into()))
            {
                refuse(owner, format!("volume {name} needs ConfigMap {map}, which is not there"));
            }
        }
        let pod_security = &spec["securityContext"];
        let is_init = |c: &Value| {
            spec["initContainers"]
                .as_array()
                .is_some_and(|list| list.iter().any(|i| std::ptr::eq(i, c)))
        };
        for container in containers(spec) {
            let who = format!("{owner} container {}", container["name"].as_str().unwrap_or("?"));
            let security = &container["securityContext"];
            let either = |key: &str| {
                if security[key].is_null() { &pod_security[key] } else { &security[key] }
            };
            if security["privileged"] == true {
                refuse(&who, "privileged".into());
            }
            if security["allowPrivilegeEscalation"] != false {
                refuse(&who, "allowPrivilegeEscalation is not false".into());
            }
            let drop: Vec<&str> = security["capabilities"]["drop"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !drop.contains(&"ALL") {
                refuse(&who, "capabilities.drop does not contain ALL".into());
            }
            for added in security["capabilities"]["add"].as_array().into_iter().flatten() {
                if added != "NET_BIND_SERVICE" {
                    refuse(&who, format!("adds capability {added}"));
                }
            }
            if either("runAsNonRoot") != true {
                refuse(&who, "runAsNonRoot is not true".into());
            }
            if either("runAsUser") == 0 {
                refuse(&who, "runs as user 0".into());
            }
            match either("seccompProfile")["type"].as_str() {
                Some("RuntimeDefault" | "Localhost") => {}
                other => {
                    refuse(&who, format!("seccompProfile.type is {other:?}, not RuntimeDefault"))
                }
            }
            if security["readOnlyRootFilesystem"] != true {
                refuse(&who, "readOnlyRootFilesystem is not true".into());
            }
            let ports: Vec<&Value> = container["ports"].as_array().into_iter().flatten().collect();
            if ports.iter().any(|p| !p["hostPort"].is_null()) {
                refuse(&who, "uses a hostPort".into());
            }
            let declared = |port: &Value| {
                ports.iter().any(|p| p["name"] == *port || p["containerPort"] == *port)
            };
            if !is_init(container) {
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    let probe_spec = &container[probe];
                    if probe_spec.is_null() {
                        refuse(&who, format!("no {probe}"));
                        continue;
                    }
                    for handler in ["httpGet", "tcpSocket", "grpc"] {
                        let port = &probe_spec[handler]["port"];
                        if !port.is_null() && !declared(port) {
                            refuse(
                                &who,
                                format!("{probe} asks port {port}, which it does not declare"),
                            );
                        }
                    }
                }
            }
            let resources = &container["resources"];
            for (path, value) in [
                ("requests.cpu", &resources["requests"]["cpu"]),
                ("requests.memory", &resources["requests"]["memory"]),
                ("limits.memory", &resources["limits"]["memory"]),
            ] {
                if value.is_null() {
                    refuse(&who, format!("no resources.{path}"));
                }
            }
            let image = container["image"].as_str().unwrap_or_default();
            match image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
                None => refuse(&who, format!("image {image} has no tag")),
                Some((_, "latest" | "dev")) => refuse(&who, format!("image {image} floats")),
                Some((name, tag))
                    if name.rsplit('/').next() == Some("academy") && tag != VERSION =>
                {
                    refuse(&who, format!("image {image} is not the release {VERSION}"))
                }
                Some(_) => {}
            }
            let mut defined = BTreeSet::new();
            for var in container["env"].as_array().into_iter().flatten() {
                let name = var["name"].as_str().unwrap_or_default();
                for used in references(var["value"].as_str().unwrap_or_default()) {
                    if !defined.contains(used) {
                        refuse(&who, format!("{name} uses $({used}), not defined before it"));
                    }
                }
                let key_ref = &var["valueFrom"]["secretKeyRef"];
                if let Some(secret) = key_ref["name"].as_str()
                    && !present.contains(&("Secret".into(), secret.into()))
                {
                    refuse(&who, format!("{name} needs Secret {secret}, which is not there"));
                }
                defined.insert(name);
            }
            let words = ["command", "args"]
                .into_iter()
                .flat_map(|k| container[k].as_array().into_iter().flatten());
            for word in words.filter_map(Value::as_str) {
                for used in references(word) {
                    if !defined.contains(used) {
                        refuse(&who, format!("its command uses $({used}), which is not defined"));
                    }
                }
            }
        }
        if pod_labels.get("app.kubernetes.io/name") == Some(&"academy-exchange") {
            let env = env_of(spec);
            if env.get("ACADEMY_EXCHANGE_BACKEND").copied() != Some("redis")
                && (object["spec"]["replicas"].as_u64().unwrap_or(1) != 1
                    || object["spec"]["strategy"]["type"] != "Recreate")
            {
                refuse(
                    owner,
                    "keeps mailboxes in memory, so must run one replica, recreated".into(),
                );
            }
        }
    }
    for service in objects.iter().filter(|o| o["kind"] == "Service") {
        let owner = name_of(service);
        let target = workloads.iter().find(|w| {
            selects(&service["spec"]["selector"], &labels(&w.template["metadata"]["labels"]))
        });
        let Some(target) = target else {
            refuse(&owner, "selects no workload".into());
            continue;
        };
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            let wanted =
                if port["targetPort"].is_null() { &port["port"] } else { &port["targetPort"] };
            let served = containers(&target.template["spec"])
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .any(|p| p["name"] == *wanted || p["containerPort"] == *wanted);
            if !served {
                refuse(
                    &owner,
                    format!("targets port {wanted}, which {} does not declare", target.owner),
                );
            }
        }
    }
    found
}

/// The names `$(NAME)` in `text` refers to (Kubernetes' variable expansion).
fn references(text: &str) -> impl Iterator<Item = &str> {
    text.split("$(").skip(1).filter_map(|rest| rest.split_once(')').map(|(name, _)| name))
}

/// Plain `name: value` environment variables of a pod's containers.
pub fn env_of(pod_spec: &Value) -> BTreeMap<&str, &str> {
    containers(pod_spec)
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .filter_map(|v| Some((v["name"].as_str()?, v["value"].as_str()?)))
        .collect()
}

/// The pod template of the workload named `name`.
pub fn pod_template<'a>(objects: &'a [Value], name: &str) -> Option<&'a Value> {
    workloads(objects)
        .into_iter()
        .find(|w| w.object["metadata"]["name"] == name)
        .map(|w| w.template)
}

/// CPU the workloads request, in millicores, replicas included.
pub fn cpu_requests_millis(objects: &[Value]) -> u64 {
    workloads(objects)
        .iter()
        .map(|w| {
            let replicas = w.object["spec"]["replicas"].as_u64().unwrap_or(1);
            let per_pod: u64 = containers(&w.template["spec"])
                .map(|c| millicores(c["resources"]["requests"]["cpu"].as_str().unwrap_or("0")))
                .sum();
            replicas * per_pod
        })
        .sum()
}

/// `250m` → 250, `1` → 1000, `0.5` → 500.
fn millicores(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse().unwrap_or(u64::MAX),
        None => quantity.parse::<f64>().map_or(u64::MAX, |cores| (cores * 1000.0).round() as u64),
    }
}

/// The workloads a PodDisruptionBudget covers, by name.
pub fn with_budget(objects: &[Value]) -> BTreeSet<String> {
    let budgets: Vec<&Value> =
        objects.iter().filter(|o| o["kind"] == "PodDisruptionBudget").collect();
    workloads(objects)
        .into_iter()
        .filter(|w| {
            let pod_labels = labels(&w.template["metadata"]["labels"]);
            budgets.iter().any(|b| selects(&b["spec"]["selector"]["matchLabels"], &pod_labels))
        })
        .filter_map(|w| w.object["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(millicores("250m"), 250);
        assert_eq!(millicores("1"), 1000);
        assert_eq!(millicores("0.5"), 500);
        assert_eq!(millicores("x"), u64::MAX);
    }

    #[test]
    fn variable_references() {
        let found: Vec<&str> = references("redis://:$(PASSWORD)@$(HOST):1").collect();
        assert_eq!(found, ["PASSWORD", "HOST"]);
        assert_eq!(references("no variables").count(), 0);
    }
}
