//! The node packaging: `systemd/pullgate.service`, `kind-config/cluster.yaml` and the example
//! policies in `kind-config/policies/`. Nothing here starts systemd or kind (neither can run on
//! the build machine); the files are parsed and checked against each other and against the
//! real binary, and `systemd-analyze verify` checks the unit when it is installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

const UNIT: &str = "systemd/pullgate.service";
const CLUSTER: &str = "kind-config/cluster.yaml";
const POLICIES: &str = "kind-config/policies";

const BINARY: &str = "/usr/local/bin/pullgate";
const LISTEN: &str = "/run/pullgate/pullgate.sock";
const CONTAINERD: &str = "/run/containerd/containerd.sock";
const POLICY_DIR: &str = "/etc/pullgate/policies";
const AUDIT_LOG: &str = "/var/log/pullgate/audit.log";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn pullgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullgate"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

// ---------------------------------------------------------------------------------------------
// A unit file, read the way systemd reads it (enough of it for these checks).

/// Section name → key → every value assigned, in order (systemd keys may repeat).
#[derive(Debug, Default)]
struct Unit {
    sections: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Unit {
    /// `[Section]` headers, `Key=Value` lines, `#`/`;` comments, and a trailing backslash that
    /// joins the next line (the backslash becomes a space, as in systemd).
    fn parse(text: &str) -> Unit {
        let mut unit = Unit::default();
        let mut section: Option<String> = None;
        let mut pending = String::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            let line = std::mem::take(&mut pending) + line;
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.to_string());
                unit.sections.entry(name.to_string()).or_default();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{UNIT}:{}: not a Key=Value line: {raw:?}", n + 1));
            let section = section
                .as_ref()
                .unwrap_or_else(|| panic!("{UNIT}:{}: {key} outside any section", n + 1));
            unit.sections
                .get_mut(section)
                .expect("section recorded")
                .entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
        assert!(pending.is_empty(), "{UNIT}: ends inside a continued line");
        unit
    }

    fn all(&self, section: &str, key: &str) -> &[String] {
        self.sections
            .get(section)
            .and_then(|s| s.get(key))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The one value of a key that must appear exactly once.
    fn one(&self, section: &str, key: &str) -> &str {
        match self.all(section, key) {
            [value] => value,
            other => panic!("[{section}] {key}= must be set exactly once, found {other:?}"),
        }
    }

    /// Every unit named by a list-valued dependency key (space-separated, repeatable).
    fn names(&self, section: &str, key: &str) -> Vec<&str> {
        self.all(section, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .collect()
    }
}

/// Splits a command line with systemd's quoting: whitespace separates words, '…' and "…" group.
fn split_command(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unterminated quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// `--flag value` pairs of a command line (every flag in the unit takes a value).
fn flags(words: &[String]) -> BTreeMap<&str, &str> {
    let mut out = BTreeMap::new();
    let mut rest = words.iter();
    while let Some(word) = rest.next() {
        assert!(word.starts_with("--"), "unexpected argument {word:?}");
        let value = rest.next().unwrap_or_else(|| panic!("{word} has no value"));
        assert!(
            out.insert(word.as_str(), value.as_str()).is_none(),
            "{word} given twice"
        );
    }
    out
}

fn unit() -> Unit {
    Unit::parse(&read(UNIT))
}

fn exec_start(unit: &Unit) -> Vec<String> {
    split_command(unit.one("Service", "ExecStart"))
}

#[test]
fn unit_runs_the_serve_contract() {
    let unit = unit();
    let words = exec_start(&unit);
    assert_eq!(words[0], BINARY, "ExecStart program");
    assert_eq!(words[1], "serve", "ExecStart subcommand");
    let flags = flags(&words[2..]);
    assert_eq!(flags.get("--listen"), Some(&LISTEN));
    assert_eq!(flags.get("--containerd"), Some(&CONTAINERD));
    assert_eq!(flags.get("--policy-dir"), Some(&POLICY_DIR));
    assert_eq!(flags.get("--audit-log"), Some(&AUDIT_LOG));

    // Every flag the unit passes is one the built binary's `serve` accepts.
    let help = pullgate()
        .args(["serve", "--help"])
        .output()
        .expect("run pullgate serve --help");
    assert!(help.status.success(), "pullgate serve --help failed");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in flags.keys() {
        assert!(
            help.split(|c: char| c.is_whitespace() || c == ',')
                .any(|w| w == *flag),
            "pullgate serve does not document {flag}:\n{help}"
        );
    }
}

#[test]
fn unit_orders_against_containerd_and_kubelet() {
    let unit = unit();
    assert!(unit.names("Unit", "After").contains(&"containerd.service"));
    let bound = unit
        .names("Unit", "Requires")
        .into_iter()
        .chain(unit.names("Unit", "BindsTo"))
        .any(|u| u == "containerd.service");
    assert!(
        bound,
        "pullgate must Require= or BindsTo= containerd.service"
    );
    assert!(unit.names("Unit", "Before").contains(&"kubelet.service"));
    // Never give up: a gate left in `failed` is a node without an image service.
    assert_eq!(unit.one("Unit", "StartLimitIntervalSec"), "0");

    assert_eq!(
        unit.one("Service", "Type"),
        "simple",
        "no sd_notify support"
    );
    assert_eq!(unit.one("Service", "Restart"), "always");
    assert_eq!(unit.one("Service", "RestartSec"), "1");

    let wanted_by = unit.names("Install", "WantedBy");
    assert!(wanted_by.contains(&"multi-user.target"));
    assert!(wanted_by.contains(&"kubelet.service"));
    // The documented choice: kubelet wants pullgate but does not require it, so stopping
    // pullgate never stops kubelet (enforcement comes from kubelet's CRI endpoints).
    assert!(
        !unit.names("Install", "RequiredBy").contains(&"kubelet.service"),
        "RequiredBy=kubelet.service lets a pullgate stop take kubelet down; see the unit's comments"
    );
}

#[test]
fn unit_holds_its_start_until_the_socket_exists() {
    let unit = unit();
    let post = split_command(unit.one("Service", "ExecStartPost"));
    let script = post.last().expect("ExecStartPost has a command");
    assert!(
        script.contains(&format!("-S {LISTEN}")),
        "ExecStartPost must wait for {LISTEN}: {post:?}"
    );
    assert!(
        post.iter()
            .any(|w| w == "timeout" || w.ends_with("/timeout") || w.starts_with("TimeoutStartSec")),
        "the socket wait must be bounded: {post:?}"
    );
}

#[test]
fn unit_is_hardened() {
    let unit = unit();
    let expected = [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("CapabilityBoundingSet", ""),
        ("RuntimeDirectory", "pullgate"),
        ("RuntimeDirectoryMode", "0750"),
        ("LogsDirectory", "pullgate"),
        ("StateDirectory", "pullgate"),
        ("MemoryMax", "256M"),
        ("TasksMax", "256"),
        ("LimitNOFILE", "65536"),
    ];
    for (key, value) in expected {
        assert_eq!(unit.one("Service", key), value, "[Service] {key}=");
    }
    let families: Vec<&str> = unit
        .one("Service", "RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    assert_eq!(families, ["AF_UNIX", "AF_INET", "AF_INET6"]);
}

/// Under ProtectSystem=strict only the directories systemd manages are writable: the socket
/// must live in RuntimeDirectory= and the audit log in LogsDirectory=.
#[test]
fn unit_writes_only_where_systemd_lets_it() {
    let unit = unit();
    let words = exec_start(&unit);
    let flags = flags(&words[2..]);
    let runtime = format!("/run/{}/", unit.one("Service", "RuntimeDirectory"));
    let logs = format!("/var/log/{}/", unit.one("Service", "LogsDirectory"));
    assert!(flags["--listen"].starts_with(&runtime), "{runtime}");
    assert!(flags["--audit-log"].starts_with(&logs), "{logs}");
    assert!(
        unit.all("Service", "ReadWritePaths").is_empty(),
        "no extra writable paths are needed (a unix socket connect ignores read-only mounts)"
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Some(analyze) = find_on_path("systemd-analyze") else {
        eprintln!("note: systemd-analyze is not installed; skipping `systemd-analyze verify`");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    // verify also checks that ExecStart's program exists: point it at the built binary.
    let text = read(UNIT).replace(BINARY, env!("CARGO_BIN_EXE_pullgate"));
    let copy = dir.path().join("pullgate.service");
    std::fs::write(&copy, text).expect("write unit copy");
    let (ok, output) = verify(&analyze, &copy);
    let about_unit: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("pullgate.service"))
        .collect();
    assert!(
        ok && about_unit.is_empty(),
        "systemd-analyze verify complained:\n{output}"
    );

    // The check is not vacuous: the same tool flags a bad setting in the same unit.
    let broken = read(UNIT)
        .replace(BINARY, env!("CARGO_BIN_EXE_pullgate"))
        .replace("Restart=always", "Restart=sometimes");
    std::fs::write(&copy, broken).expect("write broken copy");
    let (_, output) = verify(&analyze, &copy);
    assert!(
        output.contains("sometimes"),
        "systemd-analyze verify did not notice Restart=sometimes:\n{output}"
    );
}

fn verify(analyze: &Path, unit: &Path) -> (bool, String) {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(unit)
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// kind

fn cluster() -> Value {
    serde_yaml::from_str(&read(CLUSTER)).expect("kind-config/cluster.yaml is YAML")
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

#[test]
fn kind_cluster_has_a_control_plane_and_a_worker() {
    let cluster = cluster();
    assert_eq!(str_at(&cluster, "kind"), Some("Cluster"));
    assert_eq!(
        str_at(&cluster, "apiVersion"),
        Some("kind.x-k8s.io/v1alpha4")
    );
    let nodes = cluster["nodes"].as_sequence().expect("nodes is a list");
    let roles: Vec<&str> = nodes.iter().filter_map(|n| str_at(n, "role")).collect();
    assert_eq!(roles, ["control-plane", "worker"]);
}

#[test]
fn every_kind_node_mounts_the_binary_the_unit_and_the_policies() {
    let unit = unit();
    let words = exec_start(&unit);
    let flags = flags(&words[2..]);
    // What each node needs, host path → (path in the node, as the unit expects it).
    let wanted = [
        ("./target/release/pullgate", words[0].as_str()),
        (
            "./systemd/pullgate.service",
            "/etc/systemd/system/pullgate.service",
        ),
        (
            "./systemd/kubelet.service.d/10-pullgate.conf",
            "/etc/systemd/system/kubelet.service.d/10-pullgate.conf",
        ),
        ("./kind-config/policies", flags["--policy-dir"]),
    ];
    let cluster = cluster();
    for node in cluster["nodes"].as_sequence().expect("nodes") {
        let role = str_at(node, "role").unwrap_or("?");
        let mounts = node["extraMounts"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{role} node has no extraMounts"));
        for (host, container) in wanted {
            let mount = mounts
                .iter()
                .find(|m| str_at(m, "hostPath") == Some(host))
                .unwrap_or_else(|| panic!("{role} node does not mount {host}"));
            assert_eq!(
                str_at(mount, "containerPath"),
                Some(container),
                "{role}: {host}"
            );
            assert_eq!(
                mount.get("readOnly").and_then(Value::as_bool),
                Some(true),
                "{role}: {host} should be mounted read-only"
            );
        }
    }
    // The mounted sources exist in the repository (the binary only after a release build).
    assert!(repo(UNIT).is_file());
    let drop_in = std::fs::read_to_string(repo("systemd/kubelet.service.d/10-pullgate.conf"))
        .expect("kubelet drop-in");
    assert!(drop_in.contains("Wants=pullgate.service"), "{drop_in}");
    assert!(drop_in.contains("After=pullgate.service"), "{drop_in}");
    assert!(repo(POLICIES).is_dir());
}

/// The kubeadm config patches of `kind-config/cluster.yaml` whose `kind` is `kind`.
fn kubeadm_patches(cluster: &Value, kind: &str) -> Vec<Value> {
    cluster["kubeadmConfigPatches"]
        .as_sequence()
        .expect("kubeadmConfigPatches is a list")
        .iter()
        .map(|p| {
            let text = p.as_str().expect("a kubeadm patch is a YAML string");
            serde_yaml::from_str::<Value>(text).expect("a kubeadm patch parses")
        })
        .filter(|p| str_at(p, "kind") == Some(kind))
        .collect()
}

#[test]
fn kind_kubelets_send_runtime_and_image_calls_to_pullgate() {
    let cluster = cluster();
    let unit = unit();
    let words = exec_start(&unit);
    // The socket the unit listens on, as a kubelet endpoint.
    let socket = format!("unix://{}", flags(&words[2..])["--listen"]);
    let kubelet = kubeadm_patches(&cluster, "KubeletConfiguration");
    assert_eq!(kubelet.len(), 1, "one KubeletConfiguration patch");
    let patch = &kubelet[0];
    if let Some(api) = str_at(patch, "apiVersion") {
        assert_eq!(api, "kubelet.config.k8s.io/v1beta1");
    }
    // Both CRI services through pullgate: the create-time gate sits on RuntimeService.
    for field in ["containerRuntimeEndpoint", "imageServiceEndpoint"] {
        assert_eq!(
            str_at(patch, field),
            Some(socket.as_str()),
            "KubeletConfiguration {field}"
        );
    }
    // kubeadm turns nodeRegistration.criSocket into kubelet's --container-runtime-endpoint
    // flag, which beats the KubeletConfiguration: every node's must be pullgate's too.
    for kind in ["InitConfiguration", "JoinConfiguration"] {
        let patches = kubeadm_patches(&cluster, kind);
        assert_eq!(patches.len(), 1, "one {kind} patch");
        assert_eq!(
            patches[0]["nodeRegistration"]["criSocket"].as_str(),
            Some(socket.as_str()),
            "{kind} nodeRegistration.criSocket"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The example policies, through the real binary.

#[test]
fn kind_policies_validate() {
    let out = pullgate()
        .args(["validate", POLICIES])
        .output()
        .expect("run pullgate validate");
    assert!(
        out.status.success(),
        "pullgate validate {POLICIES} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The walkthrough's registry-free steps decide as kind-config/README.md says they do.
#[test]
fn kind_policies_decide_as_the_walkthrough_says() {
    let cases = [
        // The allowed pod, and kind's own add-on images.
        (
            "demo",
            "registry.k8s.io/pause:3.10",
            0,
            "allow-system-images",
        ),
        (
            "demo",
            "docker.io/kindest/kindnetd:v20250512-df8de77b",
            0,
            "allow-system-images",
        ),
        // The unlisted image.
        (
            "demo",
            "docker.io/library/busybox:1.36",
            1,
            "no matching policies",
        ),
        // Namespaces without the include label are not enforced.
        ("default", "docker.io/library/busybox:1.36", 0, "ALLOW"),
    ];
    for (namespace, image, code, needle) in cases {
        let out = pullgate()
            .args([
                "verify",
                "--policy",
                POLICIES,
                "--namespace",
                namespace,
                image,
            ])
            .output()
            .expect("run pullgate verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(code),
            "{image} in {namespace}:\n{text}"
        );
        assert!(text.contains(needle), "{image} in {namespace}:\n{text}");
    }
}
