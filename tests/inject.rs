//! `portcullis inject`, run as the real binary on the deploy/k8s manifests and on edge cases.
//! Outputs are read back as YAML into JSON values and compared field by field.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::{json, Value};

const SECRETS: &[&str] = &[
    "--jwt-secret",
    "portcullis-jwt",
    "--tls-secret",
    "portcullis-tls",
    "--redis-secret",
    "redis-auth",
];

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn docs(&self) -> Vec<Value> {
        assert!(self.ok, "inject failed: {}", self.stderr);
        docs(&self.stdout)
    }
}

/// Runs `portcullis inject ARGS` with `stdin`.
fn inject(args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("inject")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start portcullis inject");
    let written = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    // A run that refuses its arguments may exit before it reads its input.
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    let out = child.wait_with_output().expect("portcullis inject output");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// Every non-empty document of `text`, as JSON values.
fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {docs:#?}"))
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {container}"))
}

fn deployment(name: &str, labels: &str, ports: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  selector:
    matchLabels: {labels}
  template:
    metadata:
      labels: {labels}
    spec:
      containers:
        - name: game
          image: game:1
{ports}"
    )
}

const ONE_PORT: &str =
    "          ports:\n            - containerPort: 8080\n              name: http\n";

// ------------------------------------------------------------------------------------------
// The deploy/k8s example
// ------------------------------------------------------------------------------------------

#[test]
fn the_example_game_is_injected_as_deploy_k8s_game_yaml_shows() {
    let before = read("deploy/k8s/examples/game-before-inject.yaml");
    let mut args = vec![
        "--image",
        "portcullis:0.1.0",
        "--config-map",
        "portcullis-config",
    ];
    args.extend_from_slice(SECRETS);
    let out = inject(&args, &before).docs();
    let input = docs(&before);
    let shipped = docs(&read("deploy/k8s/game.yaml"));

    let got = &kind(&out, "Deployment", "game")["spec"]["template"]["spec"];
    let want = &kind(&shipped, "Deployment", "game")["spec"]["template"]["spec"];
    assert_eq!(
        container(&got["initContainers"], "portcullis"),
        container(&want["initContainers"], "portcullis")
    );
    assert_eq!(got["volumes"], want["volumes"]);
    assert_eq!(
        got["terminationGracePeriodSeconds"],
        want["terminationGracePeriodSeconds"]
    );
    // The game container itself is left as it was.
    assert_eq!(
        got["containers"],
        kind(&input, "Deployment", "game")["spec"]["template"]["spec"]["containers"]
    );
    // The Service now reaches the game through portcullis only.
    let service = kind(&out, "Service", "game");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 8443);
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    assert_eq!(
        kind(&shipped, "Service", "game")["spec"]["ports"][0]["targetPort"],
        8443
    );
}

#[test]
fn the_example_injected_with_defaults_mounts_the_shipped_config_map() {
    let shipped = docs(&read("deploy/k8s/portcullis-config.yaml"));
    let config_map = shipped
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("a ConfigMap in deploy/k8s/portcullis-config.yaml");
    let name = &config_map["metadata"]["name"];
    assert!(name.is_string(), "{config_map}");

    let out = inject(&[], &read("deploy/k8s/examples/game-before-inject.yaml")).docs();
    let spec = &kind(&out, "Deployment", "game")["spec"]["template"]["spec"];
    let volume = spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "portcullis-config"))
        .unwrap_or_else(|| panic!("no portcullis-config volume in {spec}"));
    assert_eq!(&volume["configMap"]["name"], name);
    // And the shipped game.yaml mounts the same one.
    let game = docs(&read("deploy/k8s/game.yaml"));
    let shipped_volumes = &kind(&game, "Deployment", "game")["spec"]["template"]["spec"]["volumes"];
    assert_eq!(&shipped_volumes[0], volume);
}

/// The sidecar drains only after the game has exited, within the pod's one grace period:
/// Kubernetes' default (30 s) is shorter than the sidecar's own default drain (35 s).
#[test]
fn the_grace_period_is_set_where_missing_and_a_short_one_is_noted() {
    let pod = |grace: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: lobby\n  labels: {{app: lobby}}\nspec:\n{grace}  containers:\n    - name: lobby\n      image: lobby:1\n      ports: [{{containerPort: 8080}}]\n"
        )
    };
    let grace_of = |out: &Run| out.docs()[0]["spec"]["terminationGracePeriodSeconds"].clone();

    let out = inject(SECRETS, &pod(""));
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(grace_of(&out), 45);
    assert!(
        !out.stderr.contains("terminationGracePeriodSeconds"),
        "{}",
        out.stderr
    );

    // The team's own value is kept; a short one is named, with what it needs.
    let out = inject(SECRETS, &pod("  terminationGracePeriodSeconds: 20\n"));
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(grace_of(&out), 20);
    assert!(
        out.stderr
            .contains("Pod lobby): terminationGracePeriodSeconds is 20: the sidecar gets its SIGTERM only once the game has exited"),
        "{}",
        out.stderr
    );
    let out = inject(SECRETS, &pod("  terminationGracePeriodSeconds: 120\n"));
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(grace_of(&out), 120);
    assert!(
        !out.stderr.contains("terminationGracePeriodSeconds"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_deploy_k8s_manifests_are_left_exactly_as_they_are() {
    for file in [
        "deploy/k8s/game.yaml",
        "deploy/k8s/redis.yaml",
        "deploy/k8s/portcullis-config.yaml",
        "deploy/k8s/secrets.yaml",
        "deploy/k8s/networkpolicy.yaml",
    ] {
        let text = read(file);
        let out = inject(&[], &text);
        assert!(out.ok, "{file}: {}", out.stderr);
        assert_eq!(out.stdout, text, "{file} changed");
    }
    // All at once with --network-policy: the shipped policy is recognised, nothing is added.
    let files = [
        "deploy/k8s/game.yaml",
        "deploy/k8s/redis.yaml",
        "deploy/k8s/networkpolicy.yaml",
    ];
    let mut args = vec!["--network-policy"];
    args.extend(files);
    let out = inject(&args, "");
    let expected: Vec<Value> = files.iter().flat_map(|f| docs(&read(f))).collect();
    assert_eq!(out.docs(), expected);
}

// ------------------------------------------------------------------------------------------
// Edge cases
// ------------------------------------------------------------------------------------------

#[test]
fn every_workload_of_a_multi_document_input_is_injected_and_the_rest_kept() {
    let input = format!(
        "{}---\n{}---\n{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n    - name: game\n      image: game:1\n      ports:\n        - containerPort: 7000\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  level: \"3\"\n",
        deployment("d", "{app: d}", ONE_PORT),
        deployment("s", "{app: s}", ONE_PORT).replace("kind: Deployment", "kind: StatefulSet"),
        deployment("ds", "{app: ds}", ONE_PORT).replace("kind: Deployment", "kind: DaemonSet"),
    );
    let out = inject(&[], &input).docs();
    let input = docs(&input);
    assert_eq!(out.len(), 5);
    for (kind_name, name) in [
        ("Deployment", "d"),
        ("StatefulSet", "s"),
        ("DaemonSet", "ds"),
    ] {
        let spec = &kind(&out, kind_name, name)["spec"]["template"]["spec"];
        let sidecar = container(&spec["initContainers"], "portcullis");
        assert_eq!(sidecar["restartPolicy"], "Always", "{kind_name}");
        assert_eq!(
            env(sidecar, "PORTCULLIS_UPSTREAM_URL")["value"],
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            spec["volumes"],
            json!([{"name": "portcullis-config", "configMap": {"name": "portcullis-config"}}])
        );
    }
    // A bare Pod gets it in its own spec.
    let pod = kind(&out, "Pod", "p");
    let sidecar = container(&pod["spec"]["initContainers"], "portcullis");
    assert_eq!(
        env(sidecar, "PORTCULLIS_UPSTREAM_URL")["value"],
        "http://127.0.0.1:7000"
    );
    // Not a workload: passed through untouched.
    assert_eq!(
        kind(&out, "ConfigMap", "settings"),
        kind(&input, "ConfigMap", "settings")
    );
}

/// In an IPv6-only or dual-stack cluster the sidecar listens on `::`, which takes both.
#[test]
fn the_listen_address_serves_ipv6_clusters() {
    let input = deployment("d", "{app: d}", ONE_PORT);
    let out = inject(&["--listen-address", "::"], &input).docs();
    let sidecar = container(
        &out[0]["spec"]["template"]["spec"]["initContainers"],
        "portcullis",
    );
    assert_eq!(
        env(sidecar, "PORTCULLIS_SERVER_LISTEN")["value"],
        "[::]:8443"
    );
    assert_eq!(
        env(sidecar, "PORTCULLIS_ADMIN_LISTEN")["value"],
        "[::]:9090"
    );

    for bad in ["0.0.0.0:80", "127.0.0.1", "10.1.2.3"] {
        let bad = inject(&["--listen-address", bad], &input);
        assert!(!bad.ok && bad.stdout.is_empty());
        assert!(bad.stderr.contains("--listen-address"), "{}", bad.stderr);
    }
}

#[test]
fn the_sidecar_has_ports_probes_limits_and_a_locked_down_context() {
    let out = inject(
        &[
            "--image",
            "reg/portcullis:2",
            "--port",
            "9443",
            "--admin-port",
            "9091",
        ],
        &deployment("d", "{app: d}", ONE_PORT),
    )
    .docs();
    let spec = &out[0]["spec"]["template"]["spec"];
    let sidecar = container(&spec["initContainers"], "portcullis");
    assert_eq!(sidecar["image"], "reg/portcullis:2");
    assert_eq!(
        sidecar["ports"],
        json!([
            {"name": "portcullis", "containerPort": 9443, "protocol": "TCP"},
            {"name": "portcullis-adm", "containerPort": 9091, "protocol": "TCP"},
        ])
    );
    assert_eq!(
        env(sidecar, "PORTCULLIS_SERVER_LISTEN")["value"],
        "0.0.0.0:9443"
    );
    assert_eq!(
        env(sidecar, "PORTCULLIS_ADMIN_LISTEN")["value"],
        "0.0.0.0:9091"
    );
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        sidecar["readinessProbe"]["httpGet"]["port"],
        "portcullis-adm"
    );
    assert_eq!(
        sidecar["volumeMounts"],
        json!([{"name": "portcullis-config", "mountPath": "/etc/portcullis", "readOnly": true}])
    );
    assert!(sidecar["resources"]["requests"]["memory"].is_string());
    assert!(sidecar["resources"]["limits"]["memory"].is_string());
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    // No secrets unless asked for.
    assert!(sidecar["env"]
        .as_array()
        .is_some_and(|e| e.iter().all(|v| v["name"] != "JWT_SECRET")));
    // The game container is not touched.
    assert_eq!(spec["containers"][0]["ports"][0]["containerPort"], 8080);
}

#[test]
fn injecting_twice_changes_nothing() {
    let input = format!(
        "# the game\n{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: d\nspec:\n  selector: {{app: d}}\n  ports:\n    - port: 80\n      targetPort: http\n",
        deployment("d", "{app: d}", ONE_PORT)
    );
    let args = ["--network-policy", "--jwt-secret", "jwt"];
    let once = inject(&args, &input);
    assert!(once.ok, "{}", once.stderr);
    assert_ne!(once.stdout, input);
    let twice = inject(&args, &once.stdout);
    assert!(twice.ok, "{}", twice.stderr);
    assert_eq!(twice.stdout, once.stdout);
}

#[test]
fn comments_and_key_order_are_kept() {
    let input = deployment("d", "{app: d}", ONE_PORT)
        .replace("kind: Deployment", "kind: Deployment # the game")
        .replace("    spec:\n", "    spec:\n      # pod spec\n");
    let out = inject(SECRETS, &input);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("kind: Deployment # the game"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("      # pod spec\n"), "{}", out.stdout);
    let keys: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('#'))
        .filter_map(|l| l.split(':').next())
        .collect();
    assert_eq!(keys, ["apiVersion", "kind", "metadata", "spec"]);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn a_workload_without_ports_is_refused_naming_it() {
    let input = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n---\n{}",
        deployment("quiet", "{app: q}", "")
    );
    let out = inject(&[], &input);
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("document 2"), "{}", out.stderr);
    assert!(out.stderr.contains("Deployment quiet"), "{}", out.stderr);
    assert!(out.stderr.contains("--upstream-port"), "{}", out.stderr);

    // With the port given, it is injected.
    let out = inject(&["--upstream-port", "3000"], &input).docs();
    let spec = &kind(&out, "Deployment", "quiet")["spec"]["template"]["spec"];
    assert_eq!(
        env(
            container(&spec["initContainers"], "portcullis"),
            "PORTCULLIS_UPSTREAM_URL"
        )["value"],
        "http://127.0.0.1:3000"
    );
}

#[test]
fn several_ports_need_a_choice() {
    let ports = "          ports:\n            - containerPort: 8080\n              name: http\n            - containerPort: 9100\n              name: metrics\n";
    let input = deployment("multi", "{app: m}", ports);
    let out = inject(&[], &input);
    assert!(!out.ok);
    assert!(out.stderr.contains("Deployment multi"), "{}", out.stderr);
    assert!(
        out.stderr.contains("8080") && out.stderr.contains("9100"),
        "{}",
        out.stderr
    );
    let out = inject(&["--upstream-port", "8080"], &input).docs();
    let sidecar = container(
        &out[0]["spec"]["template"]["spec"]["initContainers"],
        "portcullis",
    );
    assert_eq!(
        env(sidecar, "PORTCULLIS_UPSTREAM_URL")["value"],
        "http://127.0.0.1:8080"
    );
}

/// A port the pods do not declare would be fronted by a sidecar with nothing behind it, and
/// leave the real game port open.
#[test]
fn an_upstream_port_the_pods_do_not_declare_is_refused() {
    let ports = "          ports:\n            - containerPort: 3000\n              name: http\n            - containerPort: 9100\n              name: metrics\n";
    let out = inject(
        &["--upstream-port", "8080"],
        &deployment("game-b", "{app: game}", ports),
    );
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("Deployment game-b"), "{}", out.stderr);
    assert!(
        out.stderr.contains("--upstream-port 8080") && out.stderr.contains("3000"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_port_clash_with_the_game_is_refused() {
    let ports = "          ports:\n            - containerPort: 8443\n";
    let out = inject(&[], &deployment("tls-game", "{app: t}", ports));
    assert!(!out.ok);
    assert!(out.stderr.contains("--port"), "{}", out.stderr);
    let out = inject(
        &["--port", "9443"],
        &deployment("tls-game", "{app: t}", ports),
    );
    assert!(out.ok, "{}", out.stderr);
}

#[test]
fn non_workloads_pass_through_byte_for_byte() {
    let input = "# settings\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c # here\ndata:\n  a: \"1\"\n";
    let out = inject(&[], input);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, input);
}

#[test]
fn services_selecting_an_injected_workload_are_retargeted() {
    let service = |name: &str, selector: &str, ports: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector: {selector}\n  ports:\n{ports}")
    };
    let input = [
        deployment("game", "{app: game, tier: backend}", ONE_PORT),
        service(
            "by-number",
            "{app: game}",
            "    - port: 80\n      targetPort: 8080\n",
        ),
        service(
            "by-name",
            "{app: game}",
            "    - port: 80\n      targetPort: http\n",
        ),
        service("implicit", "{app: game}", "    - port: 8080\n"),
        service(
            "other-app",
            "{app: shop}",
            "    - port: 80\n      targetPort: 8080\n",
        ),
        service(
            "udp",
            "{app: game}",
            "    - port: 7777\n      protocol: UDP\n      targetPort: 7777\n",
        ),
    ]
    .concat();
    let out = inject(&[], &input).docs();
    let target = |name: &str| kind(&out, "Service", name)["spec"]["ports"][0]["targetPort"].clone();
    assert_eq!(target("by-number"), 8443);
    assert_eq!(target("by-name"), 8443);
    assert_eq!(target("implicit"), 8443);
    assert_eq!(
        kind(&out, "Service", "implicit")["spec"]["ports"][0]["port"],
        8080
    );
    assert_eq!(target("other-app"), 8080);
    assert_eq!(target("udp"), 7777);
}

/// On a live workload, in two steps: the workloads first, then (once the new pods are up)
/// the Services, so that no Service points at a port that old pods do not serve.
#[test]
fn workloads_only_leaves_services_for_a_second_run() {
    let input = [
        deployment("game", "{app: game}", ONE_PORT),
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: game\nspec:\n  selector: {app: game}\n  ports:\n    - port: 80\n      targetPort: 8080\n".to_string(),
    ]
    .concat();
    let first = inject(&["--workloads-only"], &input);
    let out = first.docs();
    let sidecars = &kind(&out, "Deployment", "game")["spec"]["template"]["spec"]["initContainers"];
    assert_eq!(
        container(sidecars, "portcullis")["ports"][0]["containerPort"],
        8443
    );
    assert_eq!(
        kind(&out, "Service", "game")["spec"]["ports"][0]["targetPort"],
        8080
    );
    assert!(
        first.stderr.contains("--workloads-only"),
        "{}",
        first.stderr
    );
    let service_before = input.split("---\n").nth(1).unwrap();
    assert!(
        first.stdout.contains(service_before),
        "the Service changed:\n{}",
        first.stdout
    );

    // The second run retargets the Service and leaves the injected workload as it was.
    let second = inject(&[], &first.stdout);
    let out = second.docs();
    assert_eq!(
        kind(&out, "Service", "game")["spec"]["ports"][0]["targetPort"],
        8443
    );
    let deployment_after_first = first.stdout.split("---\n").next().unwrap();
    assert!(
        second.stdout.starts_with(deployment_after_first),
        "{}",
        second.stdout
    );

    // A NetworkPolicy closes the game's port, which old pods still serve through: not with it.
    let both = inject(&["--workloads-only", "--network-policy"], &input);
    assert!(!both.ok);
}

#[test]
fn a_sidecar_is_not_updated_and_a_different_image_is_reported() {
    let input = deployment("game", "{app: game}", ONE_PORT);
    let first = inject(&["--image", "registry.example/portcullis:1"], &input);
    assert!(first.ok, "{}", first.stderr);
    let same = inject(&["--image", "registry.example/portcullis:1"], &first.stdout);
    assert_eq!(same.stdout, first.stdout);
    assert!(
        !same.stderr.contains("already has a sidecar"),
        "{}",
        same.stderr
    );
    let newer = inject(&["--image", "registry.example/portcullis:2"], &first.stdout);
    assert_eq!(newer.stdout, first.stdout, "the sidecar is left as it is");
    assert!(
        newer
            .stderr
            .contains("running registry.example/portcullis:1, not registry.example/portcullis:2"),
        "{}",
        newer.stderr
    );
}

#[test]
fn a_host_port_and_kinds_that_are_not_injected_are_reported() {
    let host_port =
        "          ports:\n            - containerPort: 8080\n              hostPort: 7080\n";
    let job = "---\napiVersion: batch/v1\nkind: Job\nmetadata:\n  name: migrate\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - name: m\n          image: m:1\n";
    let input = [
        deployment("game", "{app: game}", host_port),
        job.to_string(),
    ]
    .concat();
    let run = inject(&[], &input);
    let out = run.docs();
    assert!(
        run.stderr.contains("hostPort 7080") && run.stderr.contains("bypass portcullis"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("(Job migrate): left unchanged"),
        "{}",
        run.stderr
    );
    assert!(kind(&out, "Job", "migrate")["spec"]["template"]["spec"]
        .get("initContainers")
        .is_none());
}

#[test]
fn a_plain_http_service_port_retargeted_to_tls_is_reported() {
    let service = |name: &str, port: &str| {
        format!("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector: {{app: d}}\n  ports:\n{port}")
    };
    let input = [
        deployment("d", "{app: d}", ONE_PORT),
        service("named", "    - name: http-game\n      port: 8080\n      targetPort: http\n"),
        service("app-protocol", "    - name: game\n      appProtocol: kubernetes.io/h2c\n      port: 8080\n      targetPort: 8080\n"),
        service("eighty", "    - port: 80\n      targetPort: 8080\n"),
        service("tls", "    - name: https\n      port: 443\n      targetPort: 8080\n"),
    ]
    .concat();
    let noted = |stderr: &str, name: &str| {
        stderr.lines().any(|l| {
            l.contains(&format!("Service {name})")) && l.contains("must now connect with TLS")
        })
    };
    let out = inject(&["--tls-secret", "portcullis-tls"], &input);
    let docs = out.docs();
    for name in ["named", "app-protocol", "eighty"] {
        assert!(noted(&out.stderr, name), "{name}: {}", out.stderr);
        assert_eq!(
            kind(&docs, "Service", name)["spec"]["ports"][0]["targetPort"],
            8443
        );
    }
    assert!(!noted(&out.stderr, "tls"), "{}", out.stderr);
    // Without a certificate the sidecar speaks plain HTTP, as the game did: nothing to say.
    let out = inject(&[], &input);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        !out.stderr.contains("must now connect with TLS"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_headless_service_is_not_retargeted_and_is_reported() {
    let input = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: peers\nspec:\n  clusterIP: None\n  selector: {{app: d}}\n  ports:\n    - port: 8080\n      targetPort: http\n",
        deployment("d", "{app: d}", ONE_PORT)
    );
    let out = inject(&[], &input);
    let docs = out.docs();
    assert_eq!(
        kind(&docs, "Service", "peers"),
        kind(&self::docs(&input), "Service", "peers")
    );
    assert!(out.stderr.contains("Service peers"), "{}", out.stderr);
    assert!(out.stderr.contains("headless"), "{}", out.stderr);
    assert!(out.stderr.contains("port 8443"), "{}", out.stderr);
}

#[test]
fn a_service_port_that_bypasses_the_sidecar_is_reported() {
    let input = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: side\nspec:\n  selector: {{app: d}}\n  ports:\n    - port: 9999\n",
        deployment("d", "{app: d}", ONE_PORT)
    );
    let out = inject(&[], &input);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.contains("Service side"), "{}", out.stderr);
    assert!(out.stderr.contains("bypasses"), "{}", out.stderr);
}

#[test]
fn network_policy_admits_only_the_sidecar_ports() {
    let mut input = deployment("game", "{app: game}", ONE_PORT);
    input = input.replace("  name: game\n", "  name: game\n  namespace: arena\n");
    let out = inject(&["--network-policy", "--admin-port", "9191"], &input).docs();
    assert_eq!(out.len(), 2);
    assert_eq!(
        out[1],
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "game-portcullis", "namespace": "arena"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "game"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"ports": [
                    {"protocol": "TCP", "port": 8443},
                    {"protocol": "TCP", "port": 9191},
                ]}],
            },
        })
    );
    // Without the flag, none.
    assert_eq!(inject(&[], &input).docs().len(), 1);
}

/// `--admin-from-namespace` narrows who reaches /metrics: the admin port gets a rule of its own,
/// from those namespaces, and the note says so.
#[test]
fn network_policy_admits_the_admin_port_from_named_namespaces_only() {
    let input = deployment("game", "{app: game}", ONE_PORT);
    let args = [
        "--network-policy",
        "--admin-from-namespace",
        "monitoring,ops",
    ];
    let out = inject(&args, &input);
    assert!(out.ok, "{}", out.stderr);
    let docs = out.docs();
    let policy = kind(&docs, "NetworkPolicy", "game-portcullis");
    let from = |ns: &str| json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}});
    assert_eq!(
        policy["spec"]["ingress"],
        json!([
            {"ports": [{"protocol": "TCP", "port": 8443}]},
            {"ports": [{"protocol": "TCP", "port": 9090}], "from": [from("monitoring"), from("ops")]},
        ])
    );
    assert!(
        out.stderr
            .contains("TCP 9090 (its admin port from namespaces monitoring, ops only)"),
        "{}",
        out.stderr
    );

    // Not a namespace name, or without a policy to narrow: refused, naming the flag.
    for args in [
        &["--network-policy", "--admin-from-namespace", "Monitoring"][..],
        &["--network-policy", "--admin-from-namespace", "ops-"][..],
        &["--admin-from-namespace", "monitoring"][..],
    ] {
        let out = inject(args, &input);
        assert!(!out.ok, "{args:?} was accepted");
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
        assert!(
            out.stderr.contains("--admin-from-namespace")
                || out.stderr.contains("--network-policy"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// The Secret and ConfigMap names and the image are written into the manifest as given: one
/// Kubernetes would refuse (or the kubelet could not pull) is a usage error naming the flag and
/// the rule, not a manifest that fails at apply.
#[test]
fn names_kubernetes_would_refuse_are_refused_naming_the_flag() {
    let input = deployment("game", "{app: game}", ONE_PORT);
    let object_rule = "not a Kubernetes object name";
    for (flag, value, rule) in [
        ("--jwt-secret", "", object_rule),
        ("--jwt-secret", "Portcullis-JWT", object_rule),
        ("--tls-secret", "a/b", object_rule),
        ("--redis-secret", "", object_rule),
        ("--redis-secret", "redis..auth", object_rule),
        ("--config-map", "Bad_Name", object_rule),
        ("--config-map", "-config", object_rule),
        ("--image", "", "must not be empty"),
        ("--image", "portcullis 0.1", "must not contain spaces"),
    ] {
        // `--flag=value`, so that a value starting with '-' reaches the flag.
        let out = inject(&[&format!("{flag}={value}")], &input);
        assert_eq!(
            out.code,
            Some(2),
            "{flag} {value:?} was not a usage error: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{flag} {value:?}: {}", out.stdout);
        assert!(
            out.stderr.contains(flag) && out.stderr.contains(rule),
            "{flag} {value:?}: {}",
            out.stderr
        );
    }

    // Names with dots are Kubernetes names too, and are written as given.
    let out = inject(
        &[
            "--jwt-secret",
            "jwt.v2",
            "--tls-secret",
            "tls.game",
            "--redis-secret",
            "redis.auth",
            "--config-map",
            "portcullis.config",
            "--image",
            "registry.example:5000/portcullis:1",
        ],
        &input,
    );
    let docs = out.docs();
    let sidecar = container(
        &kind(&docs, "Deployment", "game")["spec"]["template"]["spec"]["initContainers"],
        "portcullis",
    );
    assert_eq!(sidecar["image"], "registry.example:5000/portcullis:1");
    assert_eq!(
        env(sidecar, "JWT_SECRET")["valueFrom"]["secretKeyRef"]["name"],
        "jwt.v2"
    );
    assert_eq!(
        env(sidecar, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]["name"],
        "redis.auth"
    );
    let volumes =
        kind(&docs, "Deployment", "game")["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(volumes.contains("\"portcullis.config\""), "{volumes}");
    assert!(volumes.contains("\"tls.game\""), "{volumes}");
}

#[test]
fn network_policy_closes_only_the_fronted_port() {
    // Game HTTP on 8080 (fronted), Prometheus on 9100, game UDP on 7777, a log shipper's 2020,
    // and a Service port to 9200, which no container declares.
    let ports = "          ports:
            - containerPort: 8080
              name: http
            - containerPort: 9100
              name: metrics
            - containerPort: 7777
              protocol: UDP
        - name: logs
          image: fluent-bit:3
          ports:
            - containerPort: 2020
";
    let input = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: game\nspec:\n  selector: {{app: game}}\n  ports:\n    - name: http\n      port: 80\n      targetPort: http\n    - name: metrics\n      port: 9100\n    - name: debug\n      port: 9200\n",
        deployment("game", "{app: game}", ports)
    );
    let out = inject(&["--upstream-port", "8080", "--network-policy"], &input);
    let docs = out.docs();
    let policy = kind(&docs, "NetworkPolicy", "game-portcullis");
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [
            {"protocol": "TCP", "port": 8443},
            {"protocol": "TCP", "port": 9090},
            {"protocol": "TCP", "port": 9100},
            {"protocol": "UDP", "port": 7777},
            {"protocol": "TCP", "port": 2020},
            {"protocol": "TCP", "port": 9200},
        ]}])
    );
    // The notes say what the policy does.
    let note = out
        .stderr
        .lines()
        .find(|l| l.contains("NetworkPolicy game-portcullis"))
        .unwrap_or_else(|| panic!("no note on the policy: {}", out.stderr));
    assert!(note.contains("closes the game's port 8080"), "{note}");
    for port in ["TCP 9100", "UDP 7777", "TCP 2020", "TCP 9200"] {
        assert!(note.contains(port), "{port}: {note}");
    }
    assert!(
        out.stdout.contains(
            "# Added by portcullis inject: the game's port is reached only through the sidecar."
        ),
        "{}",
        out.stdout
    );
}

#[test]
fn json_documents_are_injected_too() {
    let input = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j"}, "spec": {"containers": [{"name": "g", "image": "g", "ports": [{"containerPort": 80}]}]}}"#;
    let out = inject(SECRETS, input);
    let docs = out.docs();
    assert_eq!(docs[0]["spec"]["initContainers"][0]["name"], "portcullis");
    assert_eq!(docs[0]["spec"]["containers"][0]["name"], "g");
    // Edited in place: still one flow mapping, nothing reported.
    assert!(
        out.stdout.starts_with(r#"{"apiVersion": "v1""#),
        "{}",
        out.stdout
    );
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

#[test]
fn a_workload_annotated_disabled_is_left_alone() {
    let input = deployment("redis", "{app: redis}", ONE_PORT).replace(
        "  name: redis\n",
        "  name: redis\n  annotations:\n    portcullis/inject: disabled\n",
    );
    let out = inject(&[], &input);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout, input);
}

#[test]
fn probes_of_the_fronted_port_are_reported() {
    let probes = "          startupProbe:
            tcpSocket: {port: 8080}
          livenessProbe:
            httpGet: {path: /alive, port: http}
          readinessProbe:
            exec: {command: [/ready]}
            periodSeconds: 5
        - name: metrics
          image: exporter:1
          ports:
            - containerPort: 9100
              name: http
          readinessProbe:
            httpGet: {path: /, port: http}
";
    let input = deployment("game", "{app: game}", &format!("{ONE_PORT}{probes}"));
    let out = inject(&["--upstream-port", "8080"], &input);
    assert!(out.ok, "{}", out.stderr);
    let notes: Vec<&str> = out.stderr.lines().filter(|l| l.contains("Probe")).collect();
    assert_eq!(notes.len(), 2, "{}", out.stderr);
    assert!(
        notes[0].contains("container \"game\" startupProbe (tcpSocket port 8080)"),
        "{}",
        notes[0]
    );
    assert!(
        notes[1].contains("container \"game\" livenessProbe (httpGet port http)"),
        "{}",
        notes[1]
    );
    for note in notes {
        assert!(note.contains("127.0.0.1"), "{note}");
        assert!(note.contains("exec"), "{note}");
    }
    // The probes themselves are left as they were.
    let docs = out.docs();
    assert_eq!(
        docs[0]["spec"]["template"]["spec"]["containers"],
        self::docs(&input)[0]["spec"]["template"]["spec"]["containers"]
    );
}

#[test]
fn a_host_network_workload_is_left_alone_with_a_note() {
    let input = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: relay\nspec:\n  selector: {{app: relay}}\n  ports:\n    - port: 80\n      targetPort: 8080\n---\n{}",
        deployment("relay", "{app: relay}", ONE_PORT)
            .replace("      containers:\n", "      hostNetwork: true\n      containers:\n"),
        deployment("d", "{app: d}", ONE_PORT),
    );
    let out = inject(&["--network-policy"], &input);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.contains("Deployment relay"), "{}", out.stderr);
    assert!(out.stderr.contains("hostNetwork"), "{}", out.stderr);
    let docs = out.docs();
    let input = self::docs(&input);
    // The relay and its Service as they were, no policy for it; the other workload injected.
    assert_eq!(
        kind(&docs, "Deployment", "relay"),
        kind(&input, "Deployment", "relay")
    );
    assert_eq!(
        kind(&docs, "Service", "relay"),
        kind(&input, "Service", "relay")
    );
    assert!(docs
        .iter()
        .all(|d| d["metadata"]["name"] != "relay-portcullis"));
    assert!(
        kind(&docs, "Deployment", "d")["spec"]["template"]["spec"]["initContainers"].is_array()
    );
}

#[test]
fn without_the_secrets_notes_say_what_to_pass() {
    let input = format!(
        "{}---\n{}",
        deployment("a", "{app: a}", ONE_PORT),
        deployment("b", "{app: b}", ONE_PORT)
    );
    let out = inject(&[], &input);
    assert!(out.ok, "{}", out.stderr);
    // One note for the whole input, in the usual shape, naming what to pass.
    let notes: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("JWT_SECRET"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", out.stderr);
    let note = notes[0];
    assert!(
        note.starts_with(
            "portcullis inject: <stdin>, document 1 (Deployment a) and 1 other workload: "
        ),
        "{note}"
    );
    assert!(note.contains("--jwt-secret NAME"), "{note}");
    assert!(note.contains("public_key_pem"), "{note}");
    // And one each for the certificate and the Redis password.
    for flag in ["--tls-secret NAME", "--redis-secret NAME"] {
        let notes = out.stderr.lines().filter(|l| l.contains(flag)).count();
        assert_eq!(notes, 1, "{flag}: {}", out.stderr);
    }
    // Both are still injected, without the variable.
    for d in out.docs() {
        let sidecar = container(
            &d["spec"]["template"]["spec"]["initContainers"],
            "portcullis",
        );
        assert!(sidecar["env"]
            .as_array()
            .is_some_and(|e| e.iter().all(|v| v["name"] != "JWT_SECRET")));
    }

    // With the Secrets, or with nothing newly injected, there is nothing to say.
    let out = inject(SECRETS, &input);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    let out = inject(&[], &read("deploy/k8s/game.yaml"));
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
}

/// What `kubectl get deployment,service -o yaml` prints: a List, items not indented.
const KUBECTL_LIST: &str = "apiVersion: v1
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata:
    name: game # the game
    namespace: play
  spec:
    selector:
      matchLabels:
        app: game
    template:
      metadata:
        labels:
          app: game
      spec:
        containers:
        - image: game:1
          name: game
          ports:
          - containerPort: 8080
            name: http
            protocol: TCP
  status: {}
- apiVersion: v1
  kind: Service
  metadata:
    name: game
    namespace: play
  spec:
    ports:
    - port: 443
      targetPort: http
    selector:
      app: game
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: settings
    namespace: play
  data:
    level: \"3\"
kind: List
metadata:
  resourceVersion: \"\"
";

#[test]
fn the_items_of_a_list_are_injected_inside_it() {
    let args = ["--jwt-secret", "portcullis-jwt", "--network-policy"];
    let once = inject(&args, KUBECTL_LIST);
    let out = once.docs();
    let input = docs(KUBECTL_LIST);
    // Still one List, its items injected as documents of their own would be; then the policy.
    assert_eq!(out.len(), 2, "{}", once.stdout);
    assert_eq!(out[0]["kind"], "List");
    assert_eq!(out[0]["metadata"], input[0]["metadata"]);
    let items = out[0]["items"].as_array().expect("items");
    assert_eq!(items.len(), 3);
    let spec = &items[0]["spec"]["template"]["spec"];
    let sidecar = container(&spec["initContainers"], "portcullis");
    assert_eq!(
        env(sidecar, "PORTCULLIS_UPSTREAM_URL")["value"],
        "http://127.0.0.1:8080"
    );
    assert_eq!(
        env(sidecar, "JWT_SECRET")["valueFrom"]["secretKeyRef"]["name"],
        "portcullis-jwt"
    );
    assert_eq!(
        spec["containers"],
        input[0]["items"][0]["spec"]["template"]["spec"]["containers"]
    );
    assert_eq!(items[1]["spec"]["ports"][0]["targetPort"], 8443);
    assert_eq!(items[2], input[0]["items"][2]);
    let policy = kind(&out, "NetworkPolicy", "game-portcullis");
    assert_eq!(policy["metadata"]["namespace"], "play");
    // Edited in place, and messages name the item.
    assert!(
        once.stdout.contains("name: game # the game"),
        "{}",
        once.stdout
    );
    assert!(
        once.stderr
            .contains("<stdin>, document 1, item 1 (Deployment play/game)"),
        "{}",
        once.stderr
    );
    assert!(!once.stderr.contains("untouched"), "{}", once.stderr);

    // Injecting the output again changes nothing.
    let twice = inject(&args, &once.stdout);
    assert!(twice.ok, "{}", twice.stderr);
    assert_eq!(twice.stdout, once.stdout);

    // A refusal names the item.
    let out = inject(&[], &KUBECTL_LIST.replace("          ports:\n          - containerPort: 8080\n            name: http\n            protocol: TCP\n", ""));
    assert!(!out.ok);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("document 1, item 1 (Deployment play/game): cannot inject"),
        "{}",
        out.stderr
    );
}

#[test]
fn files_and_stdin_are_read_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a.yaml");
    std::fs::write(&file, deployment("from-file", "{app: f}", ONE_PORT)).expect("write");
    let path = file.to_str().expect("utf-8 path");
    let out = inject(
        &[path, "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-stdin\n",
    )
    .docs();
    assert_eq!(out[0]["metadata"]["name"], "from-file");
    assert!(out[0]["spec"]["template"]["spec"]["initContainers"].is_array());
    assert_eq!(out[1]["metadata"]["name"], "from-stdin");

    let missing = inject(&["/nonexistent/x.yaml"], "");
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("/nonexistent/x.yaml"),
        "{}",
        missing.stderr
    );
}

#[test]
fn not_yaml_is_refused_naming_the_input() {
    let out = inject(&[], "kind: [unclosed\n");
    assert!(!out.ok);
    assert!(out.stderr.contains("<stdin>"), "{}", out.stderr);
    assert!(out.stdout.is_empty());
}

// ------------------------------------------------------------------------------------------
// The example's configuration
// ------------------------------------------------------------------------------------------

#[test]
fn the_example_config_map_is_a_valid_config_with_the_sidecar_env() {
    let config_map = docs(&read("deploy/k8s/portcullis-config.yaml"));
    let toml = config_map[0]["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write config");
    // The TLS Secret's files, as they would be mounted.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("write cert");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("write key");

    // The sidecar's literal env from game.yaml, then what the Secrets and the files provide.
    let game = docs(&read("deploy/k8s/game.yaml"));
    let sidecar = container(
        &kind(&game, "Deployment", "game")["spec"]["template"]["spec"]["initContainers"],
        "portcullis",
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.env_clear();
    for var in sidecar["env"].as_array().expect("env list") {
        if let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) {
            cmd.env(name, value);
        }
    }
    let out = cmd
        .env("JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .env("REDIS_PASSWORD", "example")
        .env("REDIS_PORT", "tcp://10.0.0.5:6379")
        .env("PORTCULLIS_SERVER_TLS_CERT", dir.path().join("tls.crt"))
        .env("PORTCULLIS_SERVER_TLS_KEY", dir.path().join("tls.key"))
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .expect("run check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What `kubectl get all -o yaml` lists beside a Deployment: its ReplicaSet and Pod, owned by
/// their controllers.
const KUBECTL_GET_ALL: &str = "apiVersion: v1
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata:
    name: game
  spec:
    selector:
      matchLabels:
        app: game
    template:
      metadata:
        labels:
          app: game
      spec:
        containers:
        - image: game:1
          name: game
          ports:
          - containerPort: 8080
- apiVersion: apps/v1
  kind: ReplicaSet
  metadata:
    name: game-5d4f
    ownerReferences:
    - apiVersion: apps/v1
      controller: true
      kind: Deployment
      name: game
  spec:
    selector:
      matchLabels:
        app: game
    template:
      metadata:
        labels:
          app: game
      spec:
        containers:
        - image: game:1
          name: game
          ports:
          - containerPort: 8080
- apiVersion: v1
  kind: Pod
  metadata:
    name: game-5d4f-abc
    labels:
      app: game
    ownerReferences:
    - apiVersion: apps/v1
      controller: true
      kind: ReplicaSet
      name: game-5d4f
  spec:
    containers:
    - image: game:1
      name: game
      ports:
      - containerPort: 8080
kind: List
metadata: {}
";

#[test]
fn workloads_managed_by_a_controller_are_left_to_it() {
    let args = ["--jwt-secret", "portcullis-jwt", "--network-policy"];
    let once = inject(&args, KUBECTL_GET_ALL);
    assert!(once.ok, "{}", once.stderr);
    let out = once.docs();
    let input = docs(KUBECTL_GET_ALL);
    let items = out[0]["items"].as_array().expect("items");
    container(
        &items[0]["spec"]["template"]["spec"]["initContainers"],
        "portcullis",
    );
    assert_eq!(
        items[1], input[0]["items"][1],
        "the ReplicaSet is its Deployment's"
    );
    assert_eq!(
        items[2], input[0]["items"][2],
        "the Pod is its ReplicaSet's"
    );
    assert_eq!(
        out.len(),
        2,
        "one NetworkPolicy, the Deployment's: {}",
        once.stdout
    );
    kind(&out, "NetworkPolicy", "game-portcullis");
    for (item, owner) in [(2, "Deployment game"), (3, "ReplicaSet game-5d4f")] {
        assert!(
            once.stderr
                .lines()
                .any(|line| line.contains(&format!("item {item} "))
                    && line.contains(&format!("managed by {owner}"))),
            "{}",
            once.stderr
        );
    }
}

/// A Service that selects pods portcullis will front and pods it will not (opted out, on the
/// host network, or another kind) cannot be retargeted without cutting off one of them: the
/// run is refused, naming both.
#[test]
fn a_service_over_fronted_and_unfronted_pods_is_refused() {
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: game\nspec:\n  selector: {app: game}\n  ports:\n    - port: 443\n      targetPort: http\n";
    let legacy = deployment("game-legacy", "{app: game, track: legacy}", ONE_PORT).replace(
        "metadata:\n  name: game-legacy\n",
        "metadata:\n  name: game-legacy\n  annotations:\n    portcullis/inject: disabled\n",
    );
    let hosted = deployment("game-host", "{app: game, track: host}", ONE_PORT).replace(
        "    spec:\n      containers:",
        "    spec:\n      hostNetwork: true\n      containers:",
    );
    for other in [legacy, hosted] {
        let input = format!(
            "{}---\n{other}---\n{service}",
            deployment("game", "{app: game, track: stable}", ONE_PORT)
        );
        let out = inject(&[], &input);
        assert!(!out.ok, "{}", out.stdout);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
        assert!(
            out.stderr.contains("Service game") && out.stderr.contains("Deployment game"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("without a sidecar"), "{}", out.stderr);
    }

    // Sidecars on different ports: no one targetPort reaches both.
    let injected_elsewhere = inject(
        &["--port", "9443"],
        &deployment("game-b", "{app: game, track: b}", ONE_PORT),
    );
    let input = format!(
        "{}---\n{}---\n{service}",
        deployment("game", "{app: game, track: a}", ONE_PORT),
        injected_elsewhere.stdout
    );
    let out = inject(&[], &input);
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stderr.contains("9443"), "{}", out.stderr);

    // Two workloads fronted alike: the Service is retargeted.
    let input = format!(
        "{}---\n{}---\n{service}",
        deployment("game", "{app: game, track: a}", ONE_PORT),
        deployment("game-b", "{app: game, track: b}", ONE_PORT)
    );
    let out = inject(&[], &input).docs();
    assert_eq!(
        kind(&out, "Service", "game")["spec"]["ports"][0]["targetPort"],
        8443
    );
}
