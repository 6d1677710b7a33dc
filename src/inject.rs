//! `portcullis inject`: adds portcullis to Kubernetes workloads as a native sidecar, the way
//! `linkerd inject` adds its proxy, and points the Services that select them at it.
//!
//! The input is read twice: by serde_yaml_ng into plain values, from which every change is
//! decided (`Edit`s), and by yaml-edit into a lossless syntax tree, to which the same edits are
//! applied so that comments, key order and layout survive. The edited text is read back and must
//! equal the edited values; when it does not (a layout yaml-edit cannot edit faithfully, such as
//! JSON-style flow documents) the file is written from the values instead: key order kept,
//! comments lost, and a note says so. A file with nothing to change is copied byte for byte,
//! which is what makes a second injection a no-op. A workload annotated
//! `portcullis/inject: disabled` (Redis, say) is passed through like any other document, and so,
//! with a note, is one whose pods use the node's network. The items of a `List` (what
//! `kubectl get -o yaml` prints) are injected like documents of their own, inside the List.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

/// The sidecar's container name; a pod with a container of this name is already injected.
pub const SIDECAR_NAME: &str = "portcullis";
/// Name of the sidecar's public container port.
pub const PORT_NAME: &str = "portcullis";
/// Name of the sidecar's admin container port (port names are at most 15 characters).
pub const ADMIN_PORT_NAME: &str = "portcullis-adm";
const CONFIG_VOLUME: &str = "portcullis-config";
const CONFIG_DIR: &str = "/etc/portcullis";
const TLS_VOLUME: &str = "portcullis-tls";
const TLS_DIR: &str = "/etc/portcullis-tls";
/// The pod's `terminationGracePeriodSeconds` when it sets none (Kubernetes' default is 30): the
/// sidecar gets its SIGTERM only once the game has exited, then takes up to
/// `server.shutdown_delay + server.shutdown_grace` (35 s by default) within the same period,
/// and the game needs some of it first. As deploy/k8s/game.yaml.
const GRACE_PERIOD_SECONDS: u64 = 45;
/// The ConfigMap the sidecar mounts unless `--config-map` names another: the one
/// deploy/k8s/portcullis-config.yaml ships.
pub const DEFAULT_CONFIG_MAP: &str = "portcullis-config";
/// An annotation (on the workload or its pod template) that keeps inject away: `disabled`.
pub const OPT_OUT_ANNOTATION: &str = "portcullis/inject";

/// `portcullis inject [FILES...]`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// Kubernetes YAML files, one or many documents each; `-` (or no file) reads stdin.
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub options: InjectOptions,
}

/// What the sidecar looks like.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectOptions {
    /// Container image of the sidecar.
    #[arg(
        long,
        default_value = concat!("portcullis:", env!("CARGO_PKG_VERSION")),
        value_parser = image_reference
    )]
    pub image: String,
    /// ConfigMap holding `config.toml`, mounted at /etc/portcullis (deploy/k8s's is
    /// `portcullis-config`).
    #[arg(long, default_value = DEFAULT_CONFIG_MAP, value_name = "NAME", value_parser = object_name)]
    pub config_map: String,
    /// The game's port that portcullis fronts (default: the pod's only TCP containerPort).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub upstream_port: Option<u16>,
    /// The sidecar's public port.
    #[arg(long, default_value_t = 8443, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// The sidecar's admin port (/healthz, /readyz), probed by the kubelet.
    #[arg(long, default_value_t = 9090, value_parser = clap::value_parser!(u16).range(1..))]
    pub admin_port: u16,
    /// The address both of the sidecar's ports listen on: `0.0.0.0` takes IPv4 only; `::` takes
    /// IPv6 and IPv4, for IPv6-only and dual-stack clusters.
    #[arg(long, default_value = "0.0.0.0", value_name = "IP", value_parser = any_address)]
    pub listen_address: std::net::IpAddr,
    /// Secret whose key `secret` becomes JWT_SECRET.
    #[arg(long, value_name = "NAME", value_parser = object_name)]
    pub jwt_secret: Option<String>,
    /// kubernetes.io/tls Secret mounted at /etc/portcullis-tls (tls.crt, tls.key).
    #[arg(long, value_name = "NAME", value_parser = object_name)]
    pub tls_secret: Option<String>,
    /// Secret whose key `password` becomes REDIS_PASSWORD.
    #[arg(long, value_name = "NAME", value_parser = object_name)]
    pub redis_secret: Option<String>,
    /// Also emit, per injected workload, a NetworkPolicy that closes the game's port: it admits
    /// the sidecar's public and admin ports and the pods' other declared ports.
    #[arg(long)]
    pub network_policy: bool,
    /// With --network-policy, admit the admin port (/metrics) only from pods in these
    /// namespaces (repeat or comma-separate), instead of from everywhere. The kubelet's probes
    /// come from the pod's node, which a policy does not stop.
    #[arg(
        long = "admin-from-namespace",
        value_name = "NAMESPACE",
        value_delimiter = ',',
        value_parser = namespace_name,
        requires = "network_policy"
    )]
    pub admin_from_namespaces: Vec<String>,
    /// Change the workloads only, and leave Services (and NetworkPolicies) for a second run once
    /// the new pods are up: pods still without the sidecar would refuse a Service already
    /// retargeted to its port.
    #[arg(long, conflicts_with = "network_policy")]
    pub workloads_only: bool,
}

/// `0.0.0.0` or `::`: the kubelet's probes and the Service reach the pod's own addresses, so a
/// sidecar listening on any narrower one would be unreachable.
fn any_address(text: &str) -> Result<std::net::IpAddr, String> {
    match text.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Ok(ip),
        Ok(_) => Err("must be 0.0.0.0 or ::, which the kubelet and the Service can reach".into()),
        Err(_) => Err("not an IP address: 0.0.0.0 or ::".into()),
    }
}

/// A Kubernetes namespace name: a DNS label (RFC 1123), which is what
/// `kubernetes.io/metadata.name` holds.
fn namespace_name(text: &str) -> Result<String, String> {
    if text.len() <= 63 && dns_label(text) {
        Ok(text.to_string())
    } else {
        Err("not a namespace name: 1 to 63 lower-case letters, digits or '-', starting and ending with a letter or digit".into())
    }
}

/// The name of a Secret or ConfigMap: a DNS subdomain (RFC 1123), dot-separated DNS labels.
/// Kubernetes refuses any other name, so a manifest that carried one would fail at apply.
fn object_name(text: &str) -> Result<String, String> {
    if text.len() <= 253 && text.split('.').all(dns_label) {
        Ok(text.to_string())
    } else {
        Err("not a Kubernetes object name: at most 253 lower-case letters, digits, '-' or '.', each '.'-separated part starting and ending with a letter or digit".into())
    }
}

/// Lower-case letters, digits and '-', starting and ending with a letter or digit; the length
/// limit is the caller's, as it differs between a label and a subdomain.
fn dns_label(text: &str) -> bool {
    let fits = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    bytes.iter().all(|&b| fits(b) || b == b'-')
        && bytes.first().copied().is_some_and(fits)
        && bytes.last().copied().is_some_and(fits)
}

/// An image reference is written into the pod as it is: empty, or with a space or control
/// character, it is one the kubelet cannot pull.
fn image_reference(text: &str) -> Result<String, String> {
    if text.is_empty() {
        Err("must not be empty".into())
    } else if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("must not contain spaces or control characters".into())
    } else {
        Ok(text.to_string())
    }
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: concat!("portcullis:", env!("CARGO_PKG_VERSION")).into(),
            config_map: DEFAULT_CONFIG_MAP.into(),
            upstream_port: None,
            port: 8443,
            admin_port: 9090,
            listen_address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            jwt_secret: None,
            tls_secret: None,
            redis_secret: None,
            network_policy: false,
            admin_from_namespaces: Vec::new(),
            workloads_only: false,
        }
    }
}

/// One input: a file name (or `<stdin>`) and its text.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// The result: the YAML to print, and notes for the operator (stderr).
#[derive(Debug, Clone, Default)]
pub struct Injected {
    pub text: String,
    pub notes: Vec<String>,
}

/// Why nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{source_name}: not valid YAML: {reason}")]
    NotYaml { source_name: String, reason: String },
    #[error("{document}: cannot inject: {reason}")]
    Refused { document: String, reason: String },
}

/// Runs the subcommand: reads the inputs, prints the result, and the notes on stderr.
pub fn main(args: InjectArgs) -> ExitCode {
    let mut sources = Vec::new();
    let files = if args.files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        args.files
    };
    for file in files {
        let (name, text) = if file.as_os_str() == "-" {
            let mut text = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut text) {
                eprintln!("portcullis inject: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            ("<stdin>".to_string(), text)
        } else {
            match std::fs::read_to_string(&file) {
                Ok(text) => (file.display().to_string(), text),
                Err(e) => {
                    eprintln!("portcullis inject: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            }
        };
        sources.push(Source { name, text });
    }
    match inject(&sources, &args.options) {
        Ok(out) => {
            for note in &out.notes {
                eprintln!("portcullis inject: {note}");
            }
            print!("{}", out.text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portcullis inject: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deciding what changes.
// ---------------------------------------------------------------------------------------------

/// One step of a path from a document's root.
#[derive(Debug, Clone)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

/// A change to one document, applied alike to its values and to its syntax tree.
#[derive(Debug, Clone)]
enum Edit {
    /// Append `item` to the sequence `key` of the mapping at `path`; a missing (or null)
    /// sequence is created, right after the key `after` when there is one.
    Push {
        path: Vec<Seg>,
        key: &'static str,
        item: Value,
        after: Option<&'static str>,
    },
    /// Set `key` of the mapping at `path` to `value`.
    Set {
        path: Vec<Seg>,
        key: &'static str,
        value: Value,
    },
}

impl Edit {
    /// The same edit, made to a value that sits at `prefix` in the document.
    fn under(self, prefix: &[Seg]) -> Edit {
        let nest = |path: Vec<Seg>| prefix.iter().cloned().chain(path).collect();
        match self {
            Edit::Push {
                path,
                key,
                item,
                after,
            } => Edit::Push {
                path: nest(path),
                key,
                item,
                after,
            },
            Edit::Set { path, key, value } => Edit::Set {
                path: nest(path),
                key,
                value,
            },
        }
    }
}

/// The items of a `List` document (`kubectl get -o yaml`'s output), by index: each is injected
/// like a document of its own, and the List kept around them. None for any other document.
fn list_items(value: &Value) -> Vec<(usize, Value)> {
    if value.get("kind").and_then(Value::as_str) != Some("List") {
        return Vec::new();
    }
    value
        .get("items")
        .and_then(Value::as_sequence)
        .map(|items| {
            items
                .iter()
                .enumerate()
                .filter(|(_, item)| item.is_mapping())
                .map(|(i, item)| (i, item.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A document of the input, or an item of a `List` document (what `kubectl get -o yaml`
/// prints), which is injected like a document of its own.
struct Doc {
    source: usize,
    /// Index among the non-empty documents of its source.
    index: usize,
    /// For an item of a List: the List's index in the documents, and the item's in its `items`.
    parent: Option<(usize, usize)>,
    value: Value,
    edits: Vec<Edit>,
}

impl Doc {
    fn str_at(&self, path: &[&str]) -> Option<&str> {
        get(&self.value, path).and_then(Value::as_str)
    }

    fn kind(&self) -> &str {
        self.str_at(&["kind"]).unwrap_or("")
    }

    fn name(&self) -> &str {
        self.str_at(&["metadata", "name"]).unwrap_or("<unnamed>")
    }

    fn namespace(&self) -> Option<&str> {
        self.str_at(&["metadata", "namespace"])
    }

    /// How messages name it: `file, document N (Kind namespace/name)`.
    fn describe(&self, sources: &[Source]) -> String {
        let file = sources
            .get(self.source)
            .map_or("<input>", |s| s.name.as_str());
        let ns = self
            .namespace()
            .map(|n| format!("{n}/"))
            .unwrap_or_default();
        let item = self
            .parent
            .map(|(_, item)| format!(", item {}", item + 1))
            .unwrap_or_default();
        format!(
            "{file}, document {}{item} ({} {ns}{})",
            self.index + 1,
            self.kind(),
            self.name()
        )
    }
}

/// A workload found in the input, injected now or before.
struct Workload {
    doc: usize,
    namespace: Option<String>,
    name: String,
    /// Labels of its pods (the pod template's).
    pod_labels: Mapping,
    /// Labels that select its pods, for a NetworkPolicy.
    selector: Mapping,
    /// The game port portcullis fronts, when known.
    upstream: Option<u16>,
    /// Names the pod gives that port.
    upstream_names: BTreeSet<String>,
    /// What its NetworkPolicy admits besides the sidecar's ports: every other port the pods
    /// declare or a Service targets (protocol, number), so that the policy closes only the port
    /// portcullis fronts. Empty when that port is not known.
    open: Vec<(String, u16)>,
    port: u16,
    admin_port: u16,
    /// The image of a sidecar it had before (`None` when injected now).
    sidecar_image: Option<String>,
}

/// Where a kind keeps its pod spec and pod labels.
fn pod_paths(kind: &str) -> Option<(Vec<&'static str>, Vec<&'static str>)> {
    match kind {
        "Pod" => Some((vec!["spec"], vec!["metadata", "labels"])),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => Some((
            vec!["spec", "template", "spec"],
            vec!["spec", "template", "metadata", "labels"],
        )),
        _ => None,
    }
}

/// Why a kind that runs pods gets no sidecar, so that it is not passed over in silence.
fn not_injected_kind(kind: &str) -> Option<&'static str> {
    match kind {
        "Job" | "CronJob" => Some(
            "a Job's pods end when their work does, and a sidecar serving requests is not what they need (inject takes Deployments, StatefulSets, DaemonSets, ReplicaSets and Pods)",
        ),
        "ReplicationController" | "Fleet" | "GameServer" | "GameServerSet" | "Rollout" => Some(
            "inject does not know where this kind keeps its pod template (it takes Deployments, StatefulSets, DaemonSets, ReplicaSets and Pods): add the sidecar as game.yaml shows",
        ),
        _ => None,
    }
}

/// Adds the sidecar to every workload of `sources`, retargets the Services that select them, and
/// optionally appends NetworkPolicies.
pub fn inject(sources: &[Source], opts: &InjectOptions) -> Result<Injected, InjectError> {
    let mut docs = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let values = parse_all(&source.text).map_err(|reason| InjectError::NotYaml {
            source_name: source.name.clone(),
            reason,
        })?;
        for (index, value) in values.into_iter().enumerate() {
            let list = docs.len();
            let items = list_items(&value);
            docs.push(Doc {
                source: i,
                index,
                parent: None,
                value,
                edits: Vec::new(),
            });
            for (item, value) in items {
                docs.push(Doc {
                    source: i,
                    index,
                    parent: Some((list, item)),
                    value,
                    edits: Vec::new(),
                });
            }
        }
    }
    let mut notes = Vec::new();

    let mut workloads = Vec::new();
    // The workloads that get a sidecar now (not those injected before).
    let mut injected = Vec::new();
    // Pods that run without a sidecar: a Service that selects them cannot be retargeted.
    let mut bystanders = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        let Some((spec_path, labels_path)) = pod_paths(doc.kind()) else {
            if let Some(why) = not_injected_kind(doc.kind()) {
                notes.push(format!("{}: left unchanged: {why}", doc.describe(sources)));
                bystanders.push(Bystander::of(doc, sources, None));
            }
            continue;
        };
        if opted_out(&doc.value, &labels_path) {
            bystanders.push(Bystander::of(doc, sources, Some(&labels_path)));
            continue;
        }
        // Skipped rather than refused: the rest of the input can still be injected.
        if let Some(owner) = controller(&doc.value) {
            // `kubectl get all -o yaml` lists a Deployment's ReplicaSets and Pods beside it: a
            // Pod's containers cannot change once created, and the owner would undo an edit
            // of what it manages.
            notes.push(format!(
                "{}: left unchanged: it is managed by {owner}, which would undo the change (and a running Pod's containers cannot change): inject its owner",
                doc.describe(sources)
            ));
            continue;
        }
        if host_network(&doc.value, &spec_path) {
            bystanders.push(Bystander::of(doc, sources, Some(&labels_path)));
            notes.push(format!(
                "{}: left unchanged: its pods use hostNetwork, so a sidecar would listen on the node's own interfaces (ports {} and {}), the game's port would stay reachable at the node's address, and NetworkPolicies do not apply to host-network pods on most network plugins: drop hostNetwork to inject it",
                doc.describe(sources),
                opts.port,
                opts.admin_port
            ));
            continue;
        }
        let (workload, edits) =
            plan_workload(&*doc, i, &spec_path, &labels_path, opts).map_err(|reason| {
                InjectError::Refused {
                    document: doc.describe(sources),
                    reason,
                }
            })?;
        for p in non_tcp_ports(&doc.value, &spec_path) {
            notes.push(format!(
                "{}: {} port {} is not fronted by portcullis (it proxies HTTP): restrict it another way",
                doc.describe(sources),
                p.protocol,
                p.port
            ));
        }
        if let Some(upstream) = workload.upstream {
            if let Some(host_port) = host_port_of(&doc.value, &spec_path, upstream) {
                notes.push(format!(
                    "{}: port {upstream} is also published on each node as hostPort {host_port}: clients that reach <node>:{host_port} bypass portcullis (NetworkPolicies rarely cover host ports): remove the hostPort, or publish the sidecar's port {} instead",
                    doc.describe(sources),
                    opts.port
                ));
            }
            for probe in probes_of_port(&doc.value, &spec_path, upstream) {
                notes.push(format!(
                    "{}: {probe} checks port {upstream}, which portcullis fronts: the kubelet probes the pod's IP, so the probe fails once the game listens on 127.0.0.1 only (restarts, or never Ready): keep the game on 0.0.0.0 and close its port with --network-policy (which does not stop the kubelet), or make it an exec probe",
                    doc.describe(sources)
                ));
            }
        }
        if !edits.is_empty() {
            if let Some(seconds) = short_grace_period(&doc.value, &spec_path) {
                notes.push(format!(
                    "{}: terminationGracePeriodSeconds is {seconds}: the sidecar gets its SIGTERM only once the game has exited, and then drains for up to 35 s (server.shutdown_delay + server.shutdown_grace, by default) within the same period, so requests in flight may be cut off: raise it to the game's own shutdown time plus 35 ({GRACE_PERIOD_SECONDS}, as inject sets where it is missing)",
                    doc.describe(sources)
                ));
            }
            injected.push(doc.describe(sources));
        } else if let Some(image) = workload
            .sidecar_image
            .as_ref()
            .filter(|image| **image != opts.image)
        {
            notes.push(format!(
                "{}: already has a sidecar, running {image}, not {}: inject does not update a sidecar (its image, ports or Secrets): edit it, or remove it and inject again",
                doc.describe(sources),
                opts.image
            ));
        }
        doc.edits.extend(edits);
        workloads.push(workload);
    }
    if let Some(first) = injected.first() {
        let others = match injected.len() - 1 {
            0 => String::new(),
            1 => " and 1 other workload".to_string(),
            n => format!(" and {n} other workloads"),
        };
        if opts.jwt_secret.is_none() {
            notes.push(format!(
                "{first}{others}: no --jwt-secret, so the sidecar gets no JWT_SECRET: portcullis refuses to start without a JWT key, and the example ConfigMap (deploy/k8s/portcullis-config.yaml, HS256) takes its HMAC secret only from JWT_SECRET: pass --jwt-secret NAME, a Secret whose key `secret` holds it (portcullis-jwt in deploy/k8s/secrets.yaml), unless the ConfigMap's [jwt] names a key file under {CONFIG_DIR} (public_key_pem)"
            ));
        }
        if opts.tls_secret.is_none() {
            notes.push(format!(
                "{first}{others}: no --tls-secret, so the sidecar mounts no certificate: with a ConfigMap whose [server.tls] reads files under {TLS_DIR}, as the example's does, it cannot start: pass --tls-secret NAME (a kubernetes.io/tls Secret; portcullis-tls in deploy/k8s/secrets.yaml), or leave [server.tls] out where TLS ends before portcullis"
            ));
        }
        if opts.redis_secret.is_none() {
            notes.push(format!(
                "{first}{others}: no --redis-secret, so the sidecar gets no REDIS_PASSWORD: a Redis that needs one (the example's does) refuses it, and the pod never becomes ready: pass --redis-secret NAME (a Secret whose key `password` holds it; redis-auth in deploy/k8s/secrets.yaml), unless redis.url carries the password"
            ));
        }
    }

    for i in 0..docs.len() {
        if docs[i].kind() == "Service" && !opts.workloads_only {
            if let Some(reason) = mixed_service(&docs[i], &workloads, &bystanders, &docs, sources) {
                return Err(InjectError::Refused {
                    document: docs[i].describe(sources),
                    reason,
                });
            }
            let (edits, service_notes) = plan_service(&docs[i], &mut workloads, &docs, opts);
            let described = docs[i].describe(sources);
            notes.extend(
                service_notes
                    .into_iter()
                    .map(|n| format!("{described}: {n}")),
            );
            docs[i].edits.extend(edits);
        }
    }

    if opts.workloads_only && !injected.is_empty() && docs.iter().any(|d| d.kind() == "Service") {
        notes.push(
            "Services left as they are (--workloads-only): once `kubectl rollout status` says the new pods are up, run inject again without it (the workloads come out unchanged) to retarget them".to_string(),
        );
    }

    let mut policies = Vec::new();
    if opts.network_policy {
        let existing: BTreeSet<(Option<String>, String)> = docs
            .iter()
            .filter(|d| d.kind() == "NetworkPolicy")
            .map(|d| (d.namespace().map(str::to_string), d.name().to_string()))
            .collect();
        for w in &workloads {
            let name = format!("{}-portcullis", w.name);
            if existing.contains(&(w.namespace.clone(), name.clone())) {
                continue;
            }
            if w.selector.is_empty() {
                return Err(InjectError::Refused {
                    document: docs[w.doc].describe(sources),
                    reason: "its pods have no labels, so no NetworkPolicy can select them".into(),
                });
            }
            notes.push(format!(
                "{}: {}",
                docs[w.doc].describe(sources),
                policy_note(w, &name, &opts.admin_from_namespaces)
            ));
            policies.push(network_policy(w, &name, &opts.admin_from_namespaces));
        }
    }

    // A List item's edits are its List's, under `items`.
    for i in 0..docs.len() {
        if let Some((list, item)) = docs[i].parent {
            let edits = std::mem::take(&mut docs[i].edits);
            docs[list].edits.extend(
                edits
                    .into_iter()
                    .map(|e| e.under(&[Seg::Key("items"), Seg::Index(item)])),
            );
        }
    }

    let mut text = String::new();
    for (i, source) in sources.iter().enumerate() {
        let own: Vec<&Doc> = docs
            .iter()
            .filter(|d| d.source == i && d.parent.is_none())
            .collect();
        let rendered = if own.iter().all(|d| d.edits.is_empty()) {
            source.text.clone()
        } else {
            let (rendered, lossless) = render(&source.text, &own);
            if !lossless {
                notes.push(format!(
                    "{}: rewritten from its values (key order kept, comments and layout lost): the YAML editor could not change it in place",
                    source.name
                ));
            }
            rendered
        };
        append_document_text(&mut text, &rendered);
    }
    for policy in policies {
        let body = serde_yaml_ng::to_string(&policy).unwrap_or_default();
        append_document_text(
            &mut text,
            &format!("# Added by portcullis inject: the game's port is reached only through the sidecar.\n{body}"),
        );
    }
    Ok(Injected { text, notes })
}

/// Appends the text of one or more documents, separated from what is there by `---`.
fn append_document_text(out: &mut String, text: &str) {
    if text.trim().is_empty() {
        return;
    }
    if !out.is_empty() {
        if !out.ends_with('\n') {
            out.push('\n');
        }
        if !text.starts_with("---") {
            out.push_str("---\n");
        }
    }
    out.push_str(text);
    if !out.ends_with('\n') {
        out.push('\n');
    }
}

/// True when the workload or its pod template is annotated `portcullis/inject: disabled`.
fn opted_out(doc: &Value, labels_path: &[&str]) -> bool {
    let Some((_, pod_metadata)) = labels_path.split_last() else {
        return false;
    };
    [&["metadata"][..], pod_metadata].iter().any(|metadata| {
        let mut path = metadata.to_vec();
        path.extend(["annotations", OPT_OUT_ANNOTATION]);
        get(doc, &path).and_then(Value::as_str) == Some("disabled")
    })
}

/// The controller that manages this workload (`metadata.ownerReferences` with `controller:
/// true`), as `Kind name`.
fn controller(doc: &Value) -> Option<String> {
    let owners = get(doc, &["metadata", "ownerReferences"])?.as_sequence()?;
    owners
        .iter()
        .find(|owner| owner.get("controller").and_then(Value::as_bool) == Some(true))
        .map(|owner| {
            let field = |name| owner.get(name).and_then(Value::as_str).unwrap_or("?");
            format!("{} {}", field("kind"), field("name"))
        })
}

/// True when the pod spec at `spec_path` has `hostNetwork: true`.
fn host_network(doc: &Value, spec_path: &[&str]) -> bool {
    let mut path = spec_path.to_vec();
    path.push("hostNetwork");
    get(doc, &path).and_then(Value::as_bool) == Some(true)
}

/// The workload in `doc`, and the edits that inject it (none when it already is).
fn plan_workload(
    doc: &Doc,
    index: usize,
    spec_path: &[&'static str],
    labels_path: &[&'static str],
    opts: &InjectOptions,
) -> Result<(Workload, Vec<Edit>), String> {
    let Some(spec) = get(&doc.value, spec_path).and_then(Value::as_mapping) else {
        return Err(format!("no pod spec at {}", spec_path.join(".")));
    };
    let pod_labels = get(&doc.value, labels_path)
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let selector = if doc.kind() == "Pod" {
        pod_labels.clone()
    } else {
        get(&doc.value, &["spec", "selector", "matchLabels"])
            .and_then(Value::as_mapping)
            .filter(|m| !m.is_empty())
            .cloned()
            .unwrap_or_else(|| pod_labels.clone())
    };
    let containers = seq_of(spec, "containers");
    let init_containers = seq_of(spec, "initContainers");
    if containers.is_empty() {
        return Err("the pod spec has no containers".into());
    }
    let mut workload = Workload {
        doc: index,
        namespace: doc.namespace().map(str::to_string),
        name: doc.name().to_string(),
        pod_labels,
        selector,
        upstream: None,
        upstream_names: BTreeSet::new(),
        open: Vec::new(),
        port: opts.port,
        admin_port: opts.admin_port,
        sidecar_image: None,
    };

    // Already injected: describe what is there so that Services and policies still line up.
    let existing = containers
        .iter()
        .chain(&init_containers)
        .find(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_NAME));
    let declared: Vec<ContainerPort> = containers
        .iter()
        .filter(|c| c.get("name").and_then(Value::as_str) != Some(SIDECAR_NAME))
        .chain(&init_containers)
        .filter(|c| c.get("name").and_then(Value::as_str) != Some(SIDECAR_NAME))
        .flat_map(container_ports)
        .collect();
    let game_ports: Vec<ContainerPort> = declared
        .iter()
        .filter(|p| p.protocol == "TCP")
        .cloned()
        .collect();
    if let Some(sidecar) = existing {
        let ports = container_ports(sidecar);
        let named = |name: &str| ports.iter().find(|p| p.name.as_deref() == Some(name));
        workload.port = named(PORT_NAME).map_or(opts.port, |p| p.port);
        workload.admin_port = named(ADMIN_PORT_NAME).map_or(opts.admin_port, |p| p.port);
        workload.upstream = sidecar_upstream_port(sidecar);
        workload.sidecar_image = sidecar
            .get("image")
            .and_then(Value::as_str)
            .map(str::to_string);
        set_upstream_names(&mut workload, &game_ports);
        set_open(&mut workload, &declared);
        return Ok((workload, Vec::new()));
    }

    let upstream = match (opts.upstream_port, game_ports.as_slice()) {
        (Some(port), []) => port,
        // A port the pods do not declare fronts nothing, and leaves the real one open.
        (Some(port), declared) if declared.iter().all(|p| p.port != port) => {
            let list: Vec<String> = declared.iter().map(ContainerPort::describe).collect();
            return Err(format!(
                "--upstream-port {port} is not a TCP port its containers declare ({}): name one of those, and inject workloads whose game ports differ in runs of their own",
                list.join(", ")
            ));
        }
        (Some(port), _) => port,
        (None, [only]) => only.port,
        (None, []) => {
            return Err(
                "its containers declare no TCP containerPort to put portcullis in front of: pass --upstream-port"
                    .into(),
            )
        }
        (None, several) => {
            let list: Vec<String> = several.iter().map(ContainerPort::describe).collect();
            return Err(format!(
                "its containers declare several TCP ports ({}): pass --upstream-port to choose the one portcullis fronts",
                list.join(", ")
            ));
        }
    };
    for (what, port) in [("--port", opts.port), ("--admin-port", opts.admin_port)] {
        if port == upstream {
            return Err(format!(
                "{what} {port} is the game's own port: the sidecar needs a port of its own"
            ));
        }
        if let Some(p) = game_ports.iter().find(|p| p.port == port) {
            return Err(format!(
                "{what} {port} is already used by container {:?}: choose another {what}",
                p.container
            ));
        }
    }
    if opts.port == opts.admin_port {
        return Err("--port and --admin-port must differ".into());
    }
    let volumes = seq_of(spec, "volumes");
    for volume in [
        Some(CONFIG_VOLUME),
        opts.tls_secret.as_ref().map(|_| TLS_VOLUME),
    ]
    .into_iter()
    .flatten()
    {
        if volumes
            .iter()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(volume))
        {
            return Err(format!(
                "the pod already has a volume named {volume:?} but no {SIDECAR_NAME:?} container"
            ));
        }
    }
    workload.upstream = Some(upstream);
    set_upstream_names(&mut workload, &game_ports);
    set_open(&mut workload, &declared);

    let path: Vec<Seg> = spec_path.iter().map(|k| Seg::Key(k)).collect();
    let mut edits = vec![Edit::Push {
        path: path.clone(),
        key: "initContainers",
        item: sidecar(opts, upstream),
        after: Some("containers"),
    }];
    edits.push(Edit::Push {
        path: path.clone(),
        key: "volumes",
        item: map(vec![
            ("name", s(CONFIG_VOLUME)),
            ("configMap", map(vec![("name", s(&opts.config_map))])),
        ]),
        after: None,
    });
    if spec.get("terminationGracePeriodSeconds").is_none() {
        edits.push(Edit::Set {
            path: path.clone(),
            key: "terminationGracePeriodSeconds",
            value: Value::from(GRACE_PERIOD_SECONDS),
        });
    }
    if let Some(tls) = &opts.tls_secret {
        edits.push(Edit::Push {
            path,
            key: "volumes",
            item: map(vec![
                ("name", s(TLS_VOLUME)),
                ("secret", map(vec![("secretName", s(tls))])),
            ]),
            after: None,
        });
    }
    Ok((workload, edits))
}

/// The pod's own `terminationGracePeriodSeconds`, when it is shorter than inject would set.
fn short_grace_period(doc: &Value, spec_path: &[&str]) -> Option<u64> {
    get(doc, spec_path)?
        .get("terminationGracePeriodSeconds")?
        .as_u64()
        .filter(|&seconds| seconds < GRACE_PERIOD_SECONDS)
}

fn set_upstream_names(workload: &mut Workload, game_ports: &[ContainerPort]) {
    if let Some(upstream) = workload.upstream {
        workload.upstream_names = game_ports
            .iter()
            .filter(|p| p.port == upstream)
            .filter_map(|p| p.name.clone())
            .collect();
    }
}

fn set_open(workload: &mut Workload, declared: &[ContainerPort]) {
    for p in declared {
        workload.admit(&p.protocol, p.port);
    }
}

impl Workload {
    /// Has its NetworkPolicy admit `port`, unless it is the one portcullis fronts (closing that
    /// is the policy's point) or the sidecar's own; nothing when the fronted port is not known.
    fn admit(&mut self, protocol: &str, port: u16) {
        let Some(upstream) = self.upstream else {
            return;
        };
        let tcp = protocol == "TCP";
        if tcp && [upstream, self.port, self.admin_port].contains(&port) {
            return;
        }
        let entry = (protocol.to_string(), port);
        if !self.open.contains(&entry) {
            self.open.push(entry);
        }
    }
}

/// The port in the sidecar's PORTCULLIS_UPSTREAM_URL (`http://127.0.0.1:<port>`).
fn sidecar_upstream_port(sidecar: &Value) -> Option<u16> {
    let env = sidecar.get("env")?.as_sequence()?;
    let url = env
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("PORTCULLIS_UPSTREAM_URL"))?
        .get("value")?
        .as_str()?;
    url.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

/// A containerPort of one container.
#[derive(Clone)]
struct ContainerPort {
    container: String,
    name: Option<String>,
    port: u16,
    /// TCP, UDP or SCTP.
    protocol: String,
    /// The node port it is also published on, if any.
    host_port: Option<u64>,
}

impl ContainerPort {
    fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{} {:?} in container {:?}", self.port, name, self.container),
            None => format!("{} in container {:?}", self.port, self.container),
        }
    }
}

fn container_ports(container: &Value) -> Vec<ContainerPort> {
    let name = container
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    container
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.get("containerPort")?.as_u64()?).ok()?;
                    Some(ContainerPort {
                        container: name.clone(),
                        name: p.get("name").and_then(Value::as_str).map(str::to_string),
                        port,
                        protocol: protocol_of(p).to_string(),
                        host_port: p.get("hostPort").and_then(Value::as_u64),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Why a Service port looks like it carries plain HTTP (its name, appProtocol or number), if it
/// does.
fn says_plain_http(port: &Value) -> Option<String> {
    const PLAIN: [&str; 5] = ["http", "http2", "h2c", "grpc", "ws"];
    // Istio's convention: `<protocol>[-<suffix>]`.
    if let Some(name) = port.get("name").and_then(Value::as_str) {
        let protocol = name.split('-').next().unwrap_or("").to_ascii_lowercase();
        if PLAIN.contains(&protocol.as_str()) {
            return Some(format!("named {name:?}"));
        }
    }
    if let Some(app) = port.get("appProtocol").and_then(Value::as_str) {
        let lower = app.to_ascii_lowercase();
        let bare = lower.strip_prefix("kubernetes.io/").unwrap_or(&lower);
        if PLAIN.contains(&bare) {
            return Some(format!("appProtocol {app}"));
        }
    }
    if port.get("port").and_then(Value::as_u64) == Some(80) {
        return Some("port 80".into());
    }
    None
}

/// The kubelet probes of the pod's containers that reach `port` on the pod's IP, described as
/// `container "game" readinessProbe (httpGet port http)`.
fn probes_of_port(doc: &Value, spec_path: &[&str], port: u16) -> Vec<String> {
    let Some(spec) = get(doc, spec_path).and_then(Value::as_mapping) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for container in seq_of(spec, "containers") {
        let name = container.get("name").and_then(Value::as_str).unwrap_or("");
        if name == SIDECAR_NAME {
            continue;
        }
        // A probe names a port of its own container.
        let ports = container_ports(&container);
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                let Some(target) = container
                    .get(kind)
                    .and_then(|p| p.get(handler)?.get("port"))
                else {
                    continue;
                };
                let number = match target {
                    Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Value::String(named) => ports
                        .iter()
                        .find(|p| p.protocol == "TCP" && p.name.as_deref() == Some(named))
                        .map(|p| p.port),
                    _ => None,
                };
                if number == Some(port) {
                    let shown = serde_yaml_ng::to_string(target).unwrap_or_default();
                    found.push(format!(
                        "container {name:?} {kind} ({handler} port {})",
                        shown.trim()
                    ));
                }
            }
        }
    }
    found
}

/// The `protocol` of a container or Service port; Kubernetes' default is TCP.
fn protocol_of(port: &Value) -> &str {
    port.get("protocol")
        .and_then(Value::as_str)
        .unwrap_or("TCP")
}

/// The `hostPort` under which the pod's containers publish TCP `port` on the node, if any.
fn host_port_of(doc: &Value, spec_path: &[&str], port: u16) -> Option<u64> {
    let spec = get(doc, spec_path).and_then(Value::as_mapping)?;
    seq_of(spec, "containers")
        .iter()
        .flat_map(container_ports)
        .filter(|p| p.protocol == "TCP" && p.port == port)
        .find_map(|p| p.host_port)
}

/// The ports of the pod's containers that are not TCP (UDP or SCTP), which portcullis cannot
/// front.
fn non_tcp_ports(doc: &Value, spec_path: &[&str]) -> Vec<ContainerPort> {
    let Some(spec) = get(doc, spec_path).and_then(Value::as_mapping) else {
        return Vec::new();
    };
    seq_of(spec, "containers")
        .iter()
        .flat_map(container_ports)
        .filter(|p| p.protocol != "TCP")
        .collect()
}

/// Pods that run without portcullis in this input: left out, or injected in another way.
struct Bystander {
    namespace: Option<String>,
    pod_labels: Mapping,
    described: String,
}

impl Bystander {
    /// `labels_path` where known; otherwise the usual places of a pod template's labels.
    fn of(doc: &Doc, sources: &[Source], labels_path: Option<&[&str]>) -> Self {
        let paths: Vec<&[&str]> = match labels_path {
            Some(path) => vec![path],
            None => vec![
                &["spec", "template", "metadata", "labels"],
                &[
                    "spec",
                    "jobTemplate",
                    "spec",
                    "template",
                    "metadata",
                    "labels",
                ],
                &["spec", "template", "spec", "template", "metadata", "labels"],
                &["metadata", "labels"],
            ],
        };
        let pod_labels = paths
            .iter()
            .find_map(|path| get(&doc.value, path).and_then(Value::as_mapping))
            .cloned()
            .unwrap_or_default();
        Bystander {
            namespace: doc.namespace().map(str::to_string),
            pod_labels,
            described: doc.describe(sources),
        }
    }
}

/// Whether `selector` (a Service's, in `namespace`) picks pods labelled `labels` there.
fn selects(
    selector: &Mapping,
    namespace: Option<&str>,
    labels: &Mapping,
    labels_namespace: Option<&str>,
) -> bool {
    let same_namespace = match (namespace, labels_namespace) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    same_namespace
        && !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// Why a Service cannot be retargeted, if it cannot: it selects pods that will not all listen
/// on one sidecar port (some with no sidecar, or sidecars on different ports), so whatever
/// targetPort it gets, part of its endpoints would refuse its traffic.
fn mixed_service(
    service: &Doc,
    workloads: &[Workload],
    bystanders: &[Bystander],
    docs: &[Doc],
    sources: &[Source],
) -> Option<String> {
    let selector = get(&service.value, &["spec", "selector"]).and_then(Value::as_mapping)?;
    let namespace = service.namespace();
    let fronted: Vec<&Workload> = workloads
        .iter()
        .filter(|w| selects(selector, namespace, &w.pod_labels, w.namespace.as_deref()))
        .collect();
    let first = fronted.first()?;
    let name = |w: &Workload| {
        docs.get(w.doc)
            .map_or(String::new(), |d| d.describe(sources))
    };
    if let Some(bystander) = bystanders
        .iter()
        .find(|b| selects(selector, namespace, &b.pod_labels, b.namespace.as_deref()))
    {
        return Some(format!(
            "it selects the pods of {} and of {}, which runs without a sidecar: no targetPort reaches both portcullis and a game without it: give each its own Service (a selector label of its own), or inject both",
            name(first),
            bystander.described
        ));
    }
    if let Some(other) = fronted.iter().find(|w| w.port != first.port) {
        return Some(format!(
            "it selects the pods of {} (portcullis on port {}) and of {} (portcullis on port {}): no one targetPort reaches both: give each its own Service, or the same --port",
            name(first),
            first.port,
            name(other),
            other.port
        ));
    }
    None
}

/// Retargets the ports of a Service that select an injected workload's game port; the ports it
/// reaches some other way are added to what the workload's NetworkPolicy admits.
fn plan_service(
    service: &Doc,
    workloads: &mut [Workload],
    docs: &[Doc],
    opts: &InjectOptions,
) -> (Vec<Edit>, Vec<String>) {
    let mut edits = Vec::new();
    let mut notes = Vec::new();
    let Some(selector) = get(&service.value, &["spec", "selector"]).and_then(Value::as_mapping)
    else {
        return (edits, notes);
    };
    let namespace = service.namespace();
    let Some(workload) = workloads
        .iter_mut()
        .find(|w| selects(selector, namespace, &w.pod_labels, w.namespace.as_deref()))
    else {
        return (edits, notes);
    };
    let workload_name = docs
        .get(workload.doc)
        .map_or("the workload", |d| d.name())
        .to_string();
    let headless =
        get(&service.value, &["spec", "clusterIP"]).and_then(Value::as_str) == Some("None");
    let ports = get(&service.value, &["spec", "ports"])
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    for (i, port) in ports.iter().enumerate() {
        let Some(target) = port.get("targetPort").or_else(|| port.get("port")) else {
            continue;
        };
        // A port by name is one the pods declare, which the policy admits already.
        let number = target.as_u64().and_then(|n| u16::try_from(n).ok());
        if protocol_of(port) != "TCP" {
            if let Some(n) = number {
                workload.admit(protocol_of(port), n);
            }
            continue;
        }
        let to_sidecar = match target {
            Value::Number(n) => n.as_u64() == Some(u64::from(workload.port)),
            Value::String(name) => name == PORT_NAME,
            _ => false,
        };
        if to_sidecar {
            continue;
        }
        let to_game = match target {
            Value::Number(n) => {
                workload.upstream.is_some() && n.as_u64() == workload.upstream.map(u64::from)
            }
            Value::String(name) => workload.upstream_names.contains(name),
            _ => false,
        };
        let shown = serde_yaml_ng::to_string(target).unwrap_or_default();
        if to_game && headless {
            // Its clients look up the pods' addresses and connect to them on a port they know;
            // a new targetPort would only change the SRV records, and mislead.
            notes.push(format!(
                "port {} targets {} of {workload_name}, which portcullis now fronts, but the Service is headless (clusterIP: None): its clients connect to the pods directly on the port they know, so it is left as is: have them connect to port {} (portcullis), or use a Service with a cluster IP",
                i + 1,
                shown.trim(),
                workload.port
            ));
        } else if to_game {
            edits.push(Edit::Set {
                path: vec![Seg::Key("spec"), Seg::Key("ports"), Seg::Index(i)],
                key: "targetPort",
                value: Value::from(workload.port),
            });
            // With a certificate mounted the sidecar's port is TLS (the ConfigMap's [server.tls]
            // points at it); without one it speaks plain HTTP, as the game did.
            if let (Some(_), Some(why)) = (&opts.tls_secret, says_plain_http(port)) {
                notes.push(format!(
                    "port {} ({why}) now reaches portcullis on {}, which serves TLS with the certificate of --tls-secret: its clients, and any ingress or load balancer in front, must now connect with TLS (https://, wss://); rename the port and set appProtocol: https where something reads them",
                    i + 1,
                    workload.port
                ));
            }
        } else if target
            .as_u64()
            .is_some_and(|t| t == u64::from(workload.admin_port))
            || target.as_str() == Some(ADMIN_PORT_NAME)
        {
            continue;
        } else {
            if let Some(n) = number {
                workload.admit("TCP", n);
            }
            notes.push(format!(
                "port {} targets {} of {workload_name}, which portcullis does not front: traffic there bypasses it",
                i + 1,
                shown.trim()
            ));
        }
    }
    (edits, notes)
}

// ---------------------------------------------------------------------------------------------
// What is added.
// ---------------------------------------------------------------------------------------------

fn s(text: &str) -> Value {
    Value::String(text.to_string())
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}

fn http_probe(path: &str, period: u64, failures: u64) -> Value {
    map(vec![
        (
            "httpGet",
            map(vec![("path", s(path)), ("port", s(ADMIN_PORT_NAME))]),
        ),
        ("periodSeconds", Value::from(period)),
        ("failureThreshold", Value::from(failures)),
    ])
}

fn env_var(name: &str, value: &str) -> Value {
    map(vec![("name", s(name)), ("value", s(value))])
}

fn env_secret(name: &str, secret: &str, key: &str) -> Value {
    env_secret_ref(name, vec![("name", s(secret)), ("key", s(key))])
}

/// As [`env_secret`], for a key the Secret may not have: the variable is then left unset.
fn env_optional_secret(name: &str, secret: &str, key: &str) -> Value {
    env_secret_ref(
        name,
        vec![
            ("name", s(secret)),
            ("key", s(key)),
            ("optional", Value::Bool(true)),
        ],
    )
}

fn env_secret_ref(name: &str, secret_key_ref: Vec<(&str, Value)>) -> Value {
    map(vec![
        ("name", s(name)),
        (
            "valueFrom",
            map(vec![("secretKeyRef", map(secret_key_ref))]),
        ),
    ])
}

/// The sidecar container: a native sidecar (an init container that keeps running), so it starts
/// before the game and stops after it.
pub fn sidecar(opts: &InjectOptions, upstream: u16) -> Value {
    let mut env = vec![
        env_var(
            "PORTCULLIS_UPSTREAM_URL",
            &format!("http://127.0.0.1:{upstream}"),
        ),
        env_var(
            "PORTCULLIS_SERVER_LISTEN",
            &SocketAddr::new(opts.listen_address, opts.port).to_string(),
        ),
        // The kubelet probes from the node, not from localhost.
        env_var(
            "PORTCULLIS_ADMIN_LISTEN",
            &SocketAddr::new(opts.listen_address, opts.admin_port).to_string(),
        ),
    ];
    if let Some(secret) = &opts.jwt_secret {
        env.push(env_secret("JWT_SECRET", secret, "secret"));
        // The key being rotated out, while the Secret has one (README: Rotating the JWT key).
        env.push(env_optional_secret(
            "JWT_PREVIOUS_SECRET",
            secret,
            "previous",
        ));
    }
    if let Some(secret) = &opts.redis_secret {
        env.push(env_secret("REDIS_PASSWORD", secret, "password"));
    }
    let mut mounts = vec![map(vec![
        ("name", s(CONFIG_VOLUME)),
        ("mountPath", s(CONFIG_DIR)),
        ("readOnly", Value::Bool(true)),
    ])];
    if opts.tls_secret.is_some() {
        mounts.push(map(vec![
            ("name", s(TLS_VOLUME)),
            ("mountPath", s(TLS_DIR)),
            ("readOnly", Value::Bool(true)),
        ]));
    }
    let port = |name: &str, number: u16| {
        map(vec![
            ("name", s(name)),
            ("containerPort", Value::from(number)),
            ("protocol", s("TCP")),
        ])
    };
    map(vec![
        ("name", s(SIDECAR_NAME)),
        ("image", s(&opts.image)),
        ("restartPolicy", s("Always")),
        (
            "ports",
            Value::Sequence(vec![
                port(PORT_NAME, opts.port),
                port(ADMIN_PORT_NAME, opts.admin_port),
            ]),
        ),
        ("env", Value::Sequence(env)),
        ("volumeMounts", Value::Sequence(mounts)),
        ("startupProbe", http_probe("/healthz", 1, 30)),
        ("livenessProbe", http_probe("/healthz", 10, 3)),
        ("readinessProbe", http_probe("/readyz", 5, 2)),
        (
            "resources",
            map(vec![
                (
                    "requests",
                    map(vec![("cpu", s("100m")), ("memory", s("64Mi"))]),
                ),
                ("limits", map(vec![("cpu", s("1")), ("memory", s("256Mi"))])),
            ]),
        ),
        (
            "securityContext",
            map(vec![
                ("runAsNonRoot", Value::Bool(true)),
                ("runAsUser", Value::from(65532)),
                ("runAsGroup", Value::from(65532)),
                ("readOnlyRootFilesystem", Value::Bool(true)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                (
                    "capabilities",
                    map(vec![("drop", Value::Sequence(vec![s("ALL")]))]),
                ),
                ("seccompProfile", map(vec![("type", s("RuntimeDefault"))])),
            ]),
        ),
    ])
}

/// What the workload's NetworkPolicy does, for the operator.
fn policy_note(w: &Workload, name: &str, admin_from: &[String]) -> String {
    let admin_sources = if admin_from.is_empty() {
        String::new()
    } else {
        let noun = if admin_from.len() == 1 {
            "namespace"
        } else {
            "namespaces"
        };
        format!(" from {noun} {} only", admin_from.join(", "))
    };
    let sidecar = format!(
        "TCP {} (portcullis) and TCP {} (its admin port{admin_sources})",
        w.port, w.admin_port
    );
    let closed = match w.upstream {
        Some(upstream) => format!("the game's port {upstream}"),
        None => "the game's port".to_string(),
    };
    if w.open.is_empty() {
        return format!(
            "NetworkPolicy {name} admits only {sidecar}: it closes {closed} and every other port of the pods"
        );
    }
    let open: Vec<String> = w.open.iter().map(|(p, n)| format!("{p} {n}")).collect();
    format!(
        "NetworkPolicy {name} admits {sidecar}, and the pods' other ports {}, which portcullis does not front: it closes {closed}, and any port the pods serve without declaring it (add such ports to the policy)",
        open.join(", ")
    )
}

/// Closes the game's port to everything but the sidecar, whose traffic comes over loopback and
/// is not subject to the policy; the pods' other ports stay as open as they were. The admin port
/// is admitted from `admin_from`'s namespaces only, when any are given.
fn network_policy(w: &Workload, name: &str, admin_from: &[String]) -> Value {
    let mut metadata = vec![("name", s(name))];
    if let Some(ns) = &w.namespace {
        metadata.push(("namespace", s(ns)));
    }
    let port = |protocol: &str, number: u16| {
        map(vec![
            ("protocol", s(protocol)),
            ("port", Value::from(number)),
        ])
    };
    let mut ports = vec![port("TCP", w.port)];
    let mut admin_rule = None;
    if admin_from.is_empty() {
        ports.push(port("TCP", w.admin_port));
    } else {
        let namespace = |ns: &String| {
            map(vec![(
                "namespaceSelector",
                map(vec![(
                    "matchLabels",
                    map(vec![("kubernetes.io/metadata.name", s(ns))]),
                )]),
            )])
        };
        admin_rule = Some(map(vec![
            ("ports", Value::Sequence(vec![port("TCP", w.admin_port)])),
            (
                "from",
                Value::Sequence(admin_from.iter().map(namespace).collect()),
            ),
        ]));
    }
    ports.extend(w.open.iter().map(|(p, n)| port(p, *n)));
    let mut ingress = vec![map(vec![("ports", Value::Sequence(ports))])];
    ingress.extend(admin_rule);
    map(vec![
        ("apiVersion", s("networking.k8s.io/v1")),
        ("kind", s("NetworkPolicy")),
        ("metadata", map(metadata)),
        (
            "spec",
            map(vec![
                (
                    "podSelector",
                    map(vec![("matchLabels", Value::Mapping(w.selector.clone()))]),
                ),
                ("policyTypes", Value::Sequence(vec![s("Ingress")])),
                ("ingress", Value::Sequence(ingress)),
            ]),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// Values.
// ---------------------------------------------------------------------------------------------

/// Every non-empty document of `text`.
fn parse_all(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| e.to_string())?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

/// The mappings in the sequence `key` of `m` (empty when absent).
fn seq_of(m: &Mapping, key: &str) -> Vec<Value> {
    m.get(key)
        .and_then(Value::as_sequence)
        .map(|s| s.iter().filter(|v| v.is_mapping()).cloned().collect())
        .unwrap_or_default()
}

fn mapping_at_mut<'a>(value: &'a mut Value, path: &[Seg]) -> Option<&'a mut Mapping> {
    let mut cur = value;
    for seg in path {
        cur = match seg {
            Seg::Key(k) => cur.get_mut(*k)?,
            Seg::Index(i) => cur.get_mut(*i)?,
        };
    }
    cur.as_mapping_mut()
}

fn apply_to_value(value: &mut Value, edit: &Edit) -> Result<(), String> {
    match edit {
        Edit::Push {
            path, key, item, ..
        } => {
            let m = mapping_at_mut(value, path).ok_or("no mapping at the edit's path")?;
            match m.get_mut(*key) {
                Some(Value::Sequence(seq)) => seq.push(item.clone()),
                Some(Value::Null) | None => {
                    m.insert(s(key), Value::Sequence(vec![item.clone()]));
                }
                Some(_) => return Err(format!("{key} is not a list")),
            }
        }
        Edit::Set {
            path,
            key,
            value: v,
        } => {
            let m = mapping_at_mut(value, path).ok_or("no mapping at the edit's path")?;
            m.insert(s(key), v.clone());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Text.
// ---------------------------------------------------------------------------------------------

/// The text of one source with its documents' edits applied, and whether comments and layout
/// were kept.
fn render(text: &str, docs: &[&Doc]) -> (String, bool) {
    let mut expected = Vec::new();
    let mut failed = false;
    for doc in docs {
        let mut value = doc.value.clone();
        for edit in &doc.edits {
            failed |= apply_to_value(&mut value, edit).is_err();
        }
        expected.push(value);
    }
    if !failed {
        if let Some(edited) = edit_in_place(text, docs) {
            if parse_all(&edited).is_ok_and(|values| values == expected) {
                return (edited, true);
            }
        }
    }
    let parts: Vec<String> = expected
        .iter()
        .map(|v| serde_yaml_ng::to_string(v).unwrap_or_default())
        .collect();
    (parts.join("---\n"), false)
}

/// Applies the edits to the syntax tree of `text`; `None` when the tree does not line up with the
/// values or an edit cannot be made.
fn edit_in_place(text: &str, docs: &[&Doc]) -> Option<String> {
    let file = yaml_edit::YamlFile::from_str(text).ok()?;
    let mut trees = Vec::new();
    for document in file.documents() {
        let values = parse_all(&document.to_string()).ok()?;
        match values.len() {
            0 => {}
            1 => trees.push((document, values.into_iter().next()?)),
            _ => return None,
        }
    }
    if trees.len() != docs.len() {
        return None;
    }
    for ((tree, value), doc) in trees.iter().zip(docs) {
        if *value != doc.value {
            return None;
        }
        for edit in &doc.edits {
            apply_to_tree(tree, edit)?;
        }
    }
    Some(file.to_string())
}

fn tree_mapping_at(doc: &yaml_edit::Document, path: &[Seg]) -> Option<yaml_edit::Mapping> {
    use yaml_edit::YamlNode;
    let mut node = YamlNode::Mapping(doc.as_mapping()?);
    for seg in path {
        node = match (seg, node) {
            (Seg::Key(k), YamlNode::Mapping(m)) => m.get(*k)?,
            (Seg::Index(i), YamlNode::Sequence(s)) => s.get(*i)?,
            _ => return None,
        };
    }
    match node {
        YamlNode::Mapping(m) => Some(m),
        _ => None,
    }
}

/// `value` as a node of its own tree, in block style.
fn tree_value(value: &Value) -> Option<yaml_edit::YamlNode> {
    let text = serde_yaml_ng::to_string(value).ok()?;
    let doc = yaml_edit::Document::from_str(&text).ok()?;
    match value {
        Value::Mapping(_) => doc.as_mapping().map(yaml_edit::YamlNode::Mapping),
        Value::Sequence(_) => doc.as_sequence().map(yaml_edit::YamlNode::Sequence),
        _ => None,
    }
}

fn apply_to_tree(doc: &yaml_edit::Document, edit: &Edit) -> Option<()> {
    use yaml_edit::YamlNode;
    match edit {
        Edit::Push {
            path,
            key,
            item,
            after,
        } => {
            let m = tree_mapping_at(doc, path)?;
            match m.get(*key) {
                Some(YamlNode::Sequence(seq)) => seq.push(tree_value(item)?),
                Some(YamlNode::Scalar(_)) | None => {
                    let seq = tree_value(&Value::Sequence(vec![item.clone()]))?;
                    match after {
                        Some(after) if m.contains_key(*after) => {
                            m.insert_after(*after, *key, seq);
                        }
                        _ => m.set(*key, seq),
                    }
                }
                _ => return None,
            }
        }
        Edit::Set { path, key, value } => {
            let m = tree_mapping_at(doc, path)?;
            match value {
                Value::Number(n) => m.set(*key, n.as_i64()?),
                Value::String(text) => m.set(*key, text.as_str()),
                other => m.set(*key, tree_value(other)?),
            }
        }
    }
    Some(())
}

impl fmt::Display for Injected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, opts: &InjectOptions) -> Result<Injected, InjectError> {
        inject(
            &[Source {
                name: "in.yaml".into(),
                text: text.into(),
            }],
            opts,
        )
    }

    const DEPLOYMENT: &str = "\
# the game
apiVersion: apps/v1
kind: Deployment
metadata:
  name: game # its name
spec:
  selector:
    matchLabels: {app: game}
  template:
    metadata:
      labels: {app: game}
    spec:
      containers:
        - name: game
          image: game:1
          ports:
            - containerPort: 8080
";

    /// With the Secrets, so that no note is expected.
    fn with_secrets() -> InjectOptions {
        InjectOptions {
            jwt_secret: Some("portcullis-jwt".into()),
            tls_secret: Some("portcullis-tls".into()),
            redis_secret: Some("redis-auth".into()),
            ..InjectOptions::default()
        }
    }

    #[test]
    fn comments_survive_and_a_second_run_changes_nothing() {
        let once = run(DEPLOYMENT, &with_secrets()).unwrap();
        assert!(once.notes.is_empty(), "{:?}", once.notes);
        assert!(once.text.starts_with("# the game\n"), "{}", once.text);
        assert!(once.text.contains("name: game # its name"), "{}", once.text);
        let twice = run(&once.text, &with_secrets()).unwrap();
        assert_eq!(twice.text, once.text);
    }

    #[test]
    fn a_layout_the_editor_cannot_change_is_rewritten_from_values() {
        let tagged = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p # gone\nspec: !!map\n  containers:\n    - name: g\n      ports:\n        - containerPort: 80\n";
        let out = run(tagged, &with_secrets()).unwrap();
        assert_eq!(out.notes.len(), 1, "{:?}", out.notes);
        assert!(out.notes[0].contains("comments and layout lost"));
        let values = parse_all(&out.text).unwrap();
        assert_eq!(
            values[0]["spec"]["initContainers"][0]["name"],
            s("portcullis")
        );
        assert_eq!(values[0]["spec"]["containers"][0]["name"], s("g"));
    }

    #[test]
    fn flow_documents_are_edited_in_place() {
        let json = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "g", "image": "g", "ports": [{"containerPort": 80}]}]}}"#;
        let out = run(json, &with_secrets()).unwrap();
        assert!(out.notes.is_empty(), "{:?}", out.notes);
        assert!(
            out.text.starts_with(r#"{"apiVersion": "v1""#),
            "{}",
            out.text
        );
        let values = parse_all(&out.text).unwrap();
        let init = &values[0]["spec"]["initContainers"][0];
        assert_eq!(init["name"], s("portcullis"));
        assert_eq!(init["env"][0]["value"], s("http://127.0.0.1:80"));
    }

    /// Secret and ConfigMap names: RFC 1123 subdomains, each dot-separated part a label.
    #[test]
    fn object_names_follow_the_kubernetes_rule() {
        let longest = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        for valid in ["a", "portcullis-jwt", "jwt.v2", "0x", longest.as_str()] {
            assert!(object_name(valid).is_ok(), "{valid:?} was refused");
        }
        let too_long = format!("{longest}c");
        for invalid in [
            "",
            "Bad_Name",
            "a/b",
            "-a",
            "a-",
            ".a",
            "a.",
            "a..b",
            "a.-b",
            "a b",
            "é",
            too_long.as_str(),
        ] {
            assert!(object_name(invalid).is_err(), "{invalid:?} was accepted");
        }
    }

    #[test]
    fn an_image_is_anything_pullable_looking() {
        assert!(image_reference("registry.example:5000/portcullis@sha256:abc").is_ok());
        for invalid in [
            "",
            "portcullis 1",
            "portcullis\n",
            "\tportcullis",
            "a\u{7f}",
        ] {
            assert!(
                image_reference(invalid).is_err(),
                "{invalid:?} was accepted"
            );
        }
    }
}
