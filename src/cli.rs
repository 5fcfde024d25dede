//! Command-line front door: `pullgate verify` (the policy tester, running the node's engine)
//! and `pullgate validate`. Parsing and output live here; decisions come from [`crate::decide`].

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::{Engine, Request as EngineRequest};
use crate::image_ref::ImageRef;
use crate::policy::eval::{Decision, Verdict};
use crate::policy::object::{AdmissionObject, ObjectSource};
use crate::policy::snapshot::{Scope, Settings};
use crate::policy::source::{load_snapshot, load_snapshot_fetching};
use crate::registry::{Credential, Credentials, RegistryClient, RegistryConfig};

/// Exit code of `verify` when the image is denied.
pub const EXIT_DENY: u8 = 1;
/// Exit code for usage errors, bad input and "could not decide".
pub const EXIT_ERROR: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "pullgate",
    version,
    about = "Sigstore ClusterImagePolicy enforcement at the node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Decide whether an image may run, with the same engine the node uses.
    Verify(VerifyArgs),
    /// Check policy files (ClusterImagePolicy, TrustRoot, …) and print every problem.
    Validate(ValidateArgs),
    /// Serve the CRI proxy (ImageService and RuntimeService) between kubelet and containerd.
    Serve(ServeArgs),
    /// Serve the admission webhooks (AdmissionReview v1 over HTTPS) on the same engine.
    Admission(AdmissionArgs),
}

#[derive(Args, Debug)]
pub struct NotBuiltArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Policy file or directory (repeatable): the objects you would `kubectl apply`.
    #[arg(
        long = "policy",
        visible_alias = "policy-dir",
        value_name = "PATH",
        required = true,
        env = "PULLGATE_POLICY"
    )]
    pub policies: Vec<PathBuf>,
    /// Namespace the image would run in; its labels decide enforcement. Without it the image
    /// is evaluated as in an enforced namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// The workload (Pod, Deployment, … as YAML or JSON) the image would run in, as the
    /// admission shim sees it: CIP-level policies with includeSpec/includeObjectMeta/
    /// includeTypeMeta read its spec, metadata and apiVersion/kind. Its metadata.namespace is
    /// the namespace unless --namespace is given.
    #[arg(long, value_name = "FILE")]
    pub object: Option<PathBuf>,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Image reference, e.g. ghcr.io/org/app:v1 or registry:5000/app@sha256:…
    pub image: String,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Unix socket to serve CRI `runtime.v1.ImageService` and `runtime.v1.RuntimeService` on
    /// (kubelet's imageServiceEndpoint and containerRuntimeEndpoint).
    #[arg(
        long,
        default_value = "/run/pullgate/pullgate.sock",
        env = "PULLGATE_LISTEN"
    )]
    pub listen: PathBuf,
    /// containerd's CRI socket.
    #[arg(
        long,
        default_value = "/run/containerd/containerd.sock",
        env = "PULLGATE_CONTAINERD"
    )]
    pub containerd: PathBuf,
    /// Policy files or directories (repeatable), reloaded when they change.
    #[arg(long = "policy-dir", visible_alias = "policy", value_name = "PATH", default_values_t = [PathBuf::from("/etc/pullgate/policies").display().to_string()], env = "PULLGATE_POLICY_DIR")]
    pub policy_dirs: Vec<String>,
    /// Audit log file: one JSON line per decision.
    #[arg(
        long,
        default_value = "/var/log/pullgate/audit.log",
        env = "PULLGATE_AUDIT_LOG"
    )]
    pub audit_log: PathBuf,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Serve /livez, /readyz (policy snapshot fresh or stale, since when) and /metrics over
    /// plain HTTP here; `none` turns it off.
    #[arg(
        long,
        value_name = "ADDR|none",
        default_value = "127.0.0.1:9440",
        env = "PULLGATE_HEALTH_LISTEN"
    )]
    pub health_listen: HealthListen,
    /// Cluster mode: where the last synced policy objects are kept, and loaded from at start
    /// so the node enforces them while the API server is unreachable.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/pullgate/snapshot.json",
        env = "PULLGATE_SNAPSHOT_FILE"
    )]
    pub snapshot_file: PathBuf,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args, Debug)]
pub struct AdmissionArgs {
    /// PEM certificate (chain) served to the API server; re-read when the file changes.
    #[arg(long, value_name = "PEM", env = "PULLGATE_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", env = "PULLGATE_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Address to serve HTTPS on (webhooks, /livez, /readyz).
    #[arg(
        long,
        default_value = "0.0.0.0:8443",
        env = "PULLGATE_ADMISSION_LISTEN"
    )]
    pub listen: std::net::SocketAddr,
    /// Require a client certificate issued under a CA of this PEM file (the API server's, set
    /// in its AdmissionConfiguration); connections without one fail the TLS handshake. Serve
    /// probes on --health-listen then. Read at start.
    #[arg(long, value_name = "PEM", env = "PULLGATE_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Reviews read or decided at once; more are answered 429.
    #[arg(long, default_value_t = crate::admission::LimitSettings::default().max_reviews)]
    pub max_concurrent_reviews: usize,
    /// Bytes of review bodies held at once (a review holds its body until answered); a review
    /// that would go over is answered 429.
    #[arg(long, value_name = "BYTES", default_value_t = crate::admission::LimitSettings::default().max_body_bytes_in_flight)]
    pub max_inflight_bytes: usize,
    /// Open connections; more are closed at once.
    #[arg(long, default_value_t = crate::admission::LimitSettings::default().max_connections)]
    pub max_connections: usize,
    /// Policy files or directories (repeatable), reloaded when they change.
    #[arg(long = "policy-dir", visible_alias = "policy", value_name = "PATH", default_values_t = [PathBuf::from("/etc/pullgate/policies").display().to_string()], env = "PULLGATE_POLICY_DIR")]
    pub policy_dirs: Vec<String>,
    /// Label new namespaces policy.sigstore.dev/include=true unless excluded
    /// (policy.sigstore.dev/exclude=true or --exempt-namespace).
    #[arg(long)]
    pub enforce_by_default: bool,
    /// Audit log file: one JSON line per image decided.
    #[arg(long, env = "PULLGATE_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Also serve /livez, /readyz and /metrics over plain HTTP here (they are always served on
    /// the HTTPS listener too).
    #[arg(
        long,
        value_name = "ADDR|none",
        default_value = "none",
        env = "PULLGATE_HEALTH_LISTEN"
    )]
    pub health_listen: HealthListen,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub scope: ScopeArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// Files or directories to check.
    #[arg(required = true, value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub scope: ScopeArgs,
}

/// Where policies come from in cluster mode (instead of `--policy-dir`).
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Cluster mode: policies, namespaces, the config ConfigMap, the projected public keys of
    /// key Secrets (no Secret is read by `serve`; `admission` projects them) and TrustRoots
    /// watched from the API server this kubeconfig points at (instead of --policy-dir).
    #[arg(
        long,
        value_name = "PATH",
        env = "PULLGATE_KUBECONFIG",
        conflicts_with = "in_cluster"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// Cluster mode with the pod's service account (KUBERNETES_SERVICE_HOST and
    /// /var/run/secrets/kubernetes.io/serviceaccount), as the admission Deployment runs.
    #[arg(long, env = "PULLGATE_IN_CLUSTER")]
    pub in_cluster: bool,
}

impl ClusterArgs {
    /// The API client in cluster mode; `None` with a policy directory.
    async fn client(&self) -> Result<Option<::kube::Client>, String> {
        let client = match &self.kubeconfig {
            Some(path) => crate::kube::client_from_kubeconfig(path).await,
            None if self.in_cluster => crate::kube::client_in_cluster().await,
            None => return Ok(None),
        };
        client.map(Some).map_err(|e| e.to_string())
    }
}

/// An admin listener address, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthListen(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for HealthListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "none" {
            return Ok(HealthListen(None));
        }
        s.parse()
            .map(|a| HealthListen(Some(a)))
            .map_err(|e| format!("{s:?} is neither host:port nor none: {e}"))
    }
}

/// Settings shared by the long-running front doors (`serve`, `admission`).
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Rotate the audit log past this many bytes.
    #[arg(long, default_value_t = 50 << 20)]
    pub audit_max_bytes: u64,
    /// Rotated audit files kept.
    #[arg(long, default_value_t = 5)]
    pub audit_keep: usize,
    /// Do not copy audit lines to stdout (the journal under systemd).
    #[arg(long)]
    pub no_audit_stdout: bool,
    /// What happens to a decision whose audit line cannot be written (disk full, say): `deny`
    /// refuses an image that would run unrecorded in an enforced namespace (exempt namespaces
    /// keep pulling); `allow` lets the decision stand. Either way the failure is counted in
    /// `pullgate_audit_write_errors_total` and `/readyz` answers 503 until a write succeeds.
    #[arg(long, value_enum, default_value_t = crate::audit::AuditFailure::Deny)]
    pub audit_failure: crate::audit::AuditFailure,
    /// Node name written in audit lines (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Seconds an allow verdict stays cached (per digest and policy set).
    #[arg(long, default_value_t = 300)]
    pub cache_ttl: u64,
    /// Seconds a deny verdict stays cached (short, so a freshly signed image is admitted soon).
    #[arg(long, default_value_t = 30)]
    pub deny_cache_ttl: u64,
    /// Most verdicts cached.
    #[arg(long, default_value_t = 10_000)]
    pub cache_size: usize,
    /// How often the policy files are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub reload_interval_ms: u64,
    /// Seconds verified trust from a `remote` (TUF) TrustRoot is used before it is fetched
    /// again (a TrustRoot change refetches at once; a failed fetch keeps the last verified).
    #[arg(long, default_value_t = 4 * 3600, env = "PULLGATE_TUF_REFRESH_SECS")]
    pub tuf_refresh_secs: u64,
    /// Seconds in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

impl DaemonArgs {
    pub fn verdict_cache(&self) -> crate::verify::cache::VerdictCache {
        crate::verify::cache::VerdictCache::new(
            Duration::from_secs(self.cache_ttl),
            Duration::from_secs(self.deny_cache_ttl.min(self.cache_ttl)),
            Duration::from_secs(5),
            self.cache_size,
        )
    }

    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(host_name)
    }

    /// The audit sink: `path` (rotated as configured) and, unless disabled, stdout.
    pub fn audit_log(
        &self,
        path: Option<&std::path::Path>,
    ) -> Result<crate::audit::AuditLog, crate::audit::AuditError> {
        crate::audit::AuditLog::open(
            path,
            self.audit_max_bytes,
            self.audit_keep,
            !self.no_audit_stdout,
        )
        .map(|log| log.with_failure_policy(self.audit_failure))
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms.max(50))
    }
}

/// Exempt unless `--no-default-exemptions`: static control-plane pods must never be refused.
pub const DEFAULT_EXEMPT_NAMESPACE: &str = "kube-system";

#[derive(Args, Debug, Clone)]
pub struct ScopeArgs {
    /// include-label: enforce namespaces labelled policy.sigstore.dev/include=true;
    /// opt-out: enforce every namespace not labelled policy.sigstore.dev/exclude=true.
    #[arg(long, value_enum, default_value_t = ScopeArg::IncludeLabel, env = "PULLGATE_SCOPE")]
    pub scope: ScopeArg,
    /// Namespaces never enforced (repeatable), in addition to kube-system unless
    /// --no-default-exemptions.
    #[arg(long = "exempt-namespace", value_name = "NS")]
    pub exempt_namespaces: Vec<String>,
    /// Do not exempt kube-system by default: only --exempt-namespace ones are exempt.
    #[arg(long)]
    pub no_default_exemptions: bool,
    /// Namespace of key Secrets and the config-policy-controller ConfigMap.
    #[arg(
        long,
        default_value = "cosign-system",
        env = "PULLGATE_CONTROLLER_NAMESPACE"
    )]
    pub controller_namespace: String,
}

#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Docker config.json with registry credentials (default: $DOCKER_CONFIG or ~/.docker).
    #[arg(long, value_name = "PATH")]
    pub docker_config: Option<PathBuf>,
    /// Username for the registry `--auth-host` names (in `pullgate verify`, by default the
    /// image's registry).
    #[arg(long, env = "PULLGATE_REGISTRY_USERNAME", requires = "password")]
    pub username: Option<String>,
    #[arg(long, env = "PULLGATE_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Registry bearer token for the registry `--auth-host` names.
    #[arg(
        long,
        env = "PULLGATE_REGISTRY_TOKEN",
        hide_env_values = true,
        conflicts_with = "username"
    )]
    pub token: Option<String>,
    /// The one registry (host[:port], the port included) `--username/--password` or `--token`
    /// are sent to. Required by `serve` and `admission`; `verify` defaults to the image's.
    #[arg(long, value_name = "HOST[:PORT]", env = "PULLGATE_REGISTRY_AUTH_HOST")]
    pub auth_host: Option<String>,
    /// Registry (host[:port]) to reach over plain HTTP (repeatable). Loopback always is.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// Timeout of one registry request, in seconds.
    #[arg(long, default_value_t = 15)]
    pub registry_timeout: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeArg {
    IncludeLabel,
    OptOut,
}

impl ScopeArgs {
    /// The namespaces never enforced: `kube-system` (unless `--no-default-exemptions`) and
    /// every `--exempt-namespace`.
    pub fn exempt_namespaces(&self) -> BTreeSet<String> {
        let default = (!self.no_default_exemptions).then(|| DEFAULT_EXEMPT_NAMESPACE.to_string());
        default
            .into_iter()
            .chain(self.exempt_namespaces.iter().cloned())
            .collect()
    }

    pub fn settings(&self) -> Settings {
        Settings {
            scope: match self.scope {
                ScopeArg::IncludeLabel => Scope::IncludeLabel,
                ScopeArg::OptOut => Scope::OptOut,
            },
            exempt_namespaces: self.exempt_namespaces(),
            controller_namespace: self.controller_namespace.clone(),
            enforce_unknown_namespaces: false,
        }
    }
}

impl RegistryArgs {
    /// A registry client built from these flags. `image_host` is the registry of the one image
    /// a command verifies (`pullgate verify`), where an explicit credential without
    /// `--auth-host` applies.
    pub fn client(&self, image_host: Option<&str>) -> Result<RegistryClient, String> {
        RegistryClient::new(self.config(image_host)?).map_err(|e| e.to_string())
    }

    /// `--username/--password` or `--token` and the one host they are for: `--auth-host`, else
    /// `image_host`. A credential answered to whichever registry asks would reach every
    /// registry a policy or an image names, so one without a host is refused.
    pub fn explicit_credential(
        &self,
        image_host: Option<&str>,
    ) -> Result<Option<(String, Credential)>, String> {
        let credential = match (&self.username, &self.password, &self.token) {
            (Some(username), Some(password), _) => Credential::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            (_, _, Some(token)) => Credential::Bearer(token.clone()),
            _ => return Ok(None),
        };
        let host = self
            .auth_host
            .as_deref()
            .or(image_host)
            .filter(|h| !h.is_empty())
            .ok_or(
                "--username/--password and --token need --auth-host HOST[:PORT], the registry \
                 they are for",
            )?;
        Ok(Some((host.to_string(), credential)))
    }

    /// See [`RegistryArgs::client`].
    pub fn config(&self, image_host: Option<&str>) -> Result<RegistryConfig, String> {
        let path = self
            .docker_config
            .clone()
            .or_else(Credentials::default_docker_config_path);
        let mut credentials = match path {
            Some(p) => Credentials::from_docker_config(&p).map_err(|e| e.to_string())?,
            None => Credentials::default(),
        };
        if let Some((host, credential)) = self.explicit_credential(image_host)? {
            credentials.insert(&host, credential);
        }
        Ok(RegistryConfig {
            insecure: self.insecure_registries.clone(),
            credentials,
            timeout: Duration::from_secs(self.registry_timeout.max(1)),
            ..RegistryConfig::default()
        })
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Verify(args) => verify(args).await,
        Command::Validate(args) => validate(&args),
        Command::Serve(args) => serve(args).await,
        Command::Admission(args) => admission(args).await,
    }
}

fn error_exit(message: &str) -> ExitCode {
    eprintln!("pullgate: {message}");
    ExitCode::from(EXIT_ERROR)
}

async fn verify(args: VerifyArgs) -> ExitCode {
    let image_host = match ImageRef::parse(&args.image) {
        Ok(image) => image.registry().to_string(),
        Err(e) => return error_exit(&e.to_string()),
    };
    // A one-shot check fetches what the policies name (remote policy texts, `remote` TUF
    // TrustRoots) before it decides.
    let fetcher = crate::policy::remote::RemoteFetcher::default();
    let tuf = crate::policy::tuf_source::RemoteTuf::new(crate::policy::tuf_source::DEFAULT_REFRESH);
    let snapshot =
        match load_snapshot_fetching(&args.policies, args.scope.settings(), &fetcher, &tuf).await {
            Ok(s) => s,
            Err(problems) => {
                for p in &problems {
                    eprintln!("pullgate: {p}");
                }
                return error_exit(&format!(
                    "{} problem(s) in the policies; nothing was verified",
                    problems.len()
                ));
            }
        };
    // An explicit credential without --auth-host is for the registry of the image verified.
    let registry = match args.registry.client(Some(&image_host)) {
        Ok(r) => r,
        Err(e) => return error_exit(&e),
    };
    let object = match args.object.as_deref().map(read_object).transpose() {
        Ok(o) => o,
        Err(e) => return error_exit(&e),
    };
    let namespace = args.namespace.as_deref().or_else(|| {
        object
            .as_ref()
            .and_then(|o| o.metadata.as_ref()?.get("namespace")?.as_str())
    });
    let engine = Engine {
        policies: std::sync::Arc::new(crate::policy::source::Fixed::new(snapshot)),
        registry,
        // One decision: the cache only serves the engine's single-flight path.
        cache: crate::verify::cache::VerdictCache::new(
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            1,
        ),
        // `pullgate verify` prints its decision; it writes no audit file.
        audit: crate::audit::AuditLog::silent(),
        node: host_name(),
    };
    let request = EngineRequest {
        object: object.as_ref(),
        ..EngineRequest::new(crate::audit::Source::Cli, namespace)
    };
    let decision = engine.decide(&args.image, &request).await.decision;
    let printed = match args.output {
        Output::Json => serde_json::to_string_pretty(&decision)
            .map(|s| s + "\n")
            .unwrap_or_default(),
        Output::Text => render_text(&decision),
    };
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (`| head`) must not turn a verdict into a panic.
    let _ = stdout.write_all(printed.as_bytes());
    let _ = stdout.flush();
    ExitCode::from(match decision.verdict {
        Verdict::Allow | Verdict::Warn => 0,
        Verdict::Deny => EXIT_DENY,
        Verdict::Error => EXIT_ERROR,
    })
}

/// The workload in `path` (YAML or JSON), for `verify --object`.
fn read_object(path: &std::path::Path) -> Result<AdmissionObject, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--object {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_yaml::from_str(&text)
        .map_err(|e| format!("--object {}: not YAML or JSON: {e}", path.display()))?;
    if !value.is_object() {
        return Err(format!(
            "--object {}: not a Kubernetes object",
            path.display()
        ));
    }
    Ok(AdmissionObject::from_object(ObjectSource::Manifest, &value))
}

/// Human-readable decision: verdict line, reasons, then each policy and authority.
pub fn render_text(d: &Decision) -> String {
    let mut out = String::new();
    let digest = d
        .digest
        .as_deref()
        .map(|x| format!(" ({x})"))
        .unwrap_or_default();
    out.push_str(&format!(
        "{}: {}{digest}\n",
        d.verdict.as_str().to_uppercase(),
        d.image
    ));
    if let Some(ns) = &d.namespace {
        let state = if d.enforced {
            "enforced"
        } else {
            "not enforced"
        };
        out.push_str(&format!("  namespace: {ns} ({state})\n"));
    }
    for reason in &d.reasons {
        out.push_str(&format!("  reason: {reason}\n"));
    }
    for p in &d.policies {
        let mode = match p.mode {
            crate::policy::snapshot::Mode::Enforce => "enforce",
            crate::policy::snapshot::Mode::Warn => "warn",
        };
        let result = if p.passed { "pass" } else { "fail" };
        out.push_str(&format!("  policy {} [{mode}]: {result}\n", p.name));
        for problem in &p.problems {
            match problem.strip_prefix(crate::policy::eval::CIP_POLICY_FAILED) {
                Some(cause) => out.push_str(&format!("    spec.policy: fail: {cause}\n")),
                None => out.push_str(&format!("    invalid: {problem}\n")),
            }
        }
        for a in &p.authorities {
            let result = if a.passed { "pass" } else { "fail" };
            match &a.reason {
                Some(r) => out.push_str(&format!("    authority {}: {result}: {r}\n", a.name)),
                None => out.push_str(&format!("    authority {}: {result}\n", a.name)),
            }
        }
    }
    out
}

fn validate(args: &ValidateArgs) -> ExitCode {
    match load_snapshot(&args.paths, args.scope.settings()) {
        Ok(snapshot) => {
            println!(
                "ok: {} ClusterImagePolicy object(s) valid",
                snapshot.policies.len()
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in &problems {
                println!("{p}");
            }
            eprintln!("pullgate: {} problem(s) found", problems.len());
            ExitCode::from(1)
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

async fn serve(args: ServeArgs) -> ExitCode {
    use crate::cri::{bind, containerd_channel, Proxy, ServeError};
    use std::sync::Arc;

    if let Err(e) = args.registry.explicit_credential(None) {
        return error_exit(&e);
    }
    if !args.containerd.exists() {
        return error_exit(&ServeError::NoContainerd(args.containerd.clone()).to_string());
    }
    let audit = match args.daemon.audit_log(Some(&args.audit_log)) {
        Ok(a) => a,
        Err(e) => return error_exit(&e.to_string()),
    };
    let containerd = match containerd_channel(&args.containerd) {
        Ok(c) => c,
        Err(e) => return error_exit(&e.to_string()),
    };
    // kubelet needs this socket for every container operation: it is bound and served before
    // anything that can wait on the network (credential helpers, remote policies, TUF, the
    // API server). Until the policies are loaded, pulls and creates outside the exempt
    // namespaces are refused with the reason; everything else is forwarded.
    let listener = match bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => return error_exit(&e.to_string()),
    };
    let settings = args.scope.settings();
    let proxy = Arc::new(Proxy {
        containerd,
        engine: tokio::sync::OnceCell::new(),
        exempt_namespaces: settings.exempt_namespaces.clone(),
        pull_credentials: Default::default(),
    });
    tracing::info!(listen = %args.listen.display(), containerd = %args.containerd.display(), "pullgate serving");
    eprintln!(
        "pullgate: serving runtime.v1.ImageService and runtime.v1.RuntimeService on {} for {}",
        args.listen.display(),
        args.containerd.display()
    );

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    let shutdown = stopped(stop.clone());
    let grace = Duration::from_secs(args.daemon.shutdown_grace);
    let server = proxy.clone().serve(listener, shutdown);
    tokio::pin!(server);

    let startup = async {
        let registry = args.registry.client(None)?;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let audit = audit.with_metrics(metrics.clone());
        let client = args.cluster.client().await?;
        let (policies, watcher) = policy_source(
            client,
            &args.policy_dirs,
            settings,
            args.daemon.reload_interval(),
            Duration::from_secs(args.daemon.tuf_refresh_secs.max(1)),
            Some(args.snapshot_file.clone()),
        )
        .await?;
        let admin = start_admin(args.health_listen, policies.clone(), metrics.clone()).await?;
        let engine = crate::engine::Engine {
            policies,
            registry,
            cache: args.daemon.verdict_cache(),
            audit,
            node: args.daemon.node(),
        };
        if proxy.engine.set(engine).is_err() {
            return Err("the decision engine was started twice".to_string());
        }
        tracing::info!("policies loaded: pulls and creates are decided");
        Ok::<_, String>((watcher, admin))
    };
    let started = tokio::select! {
        r = &mut server => {
            // Stopped (SIGTERM) or failed before the policies were loaded.
            let _ = std::fs::remove_file(&args.listen);
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => error_exit(&e.to_string()),
            };
        }
        started = startup => started,
    };
    let (watcher, admin) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&args.listen);
            return error_exit(&e);
        }
    };
    let result = tokio::select! {
        r = &mut server => r,
        _ = async { stopped(stop).await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown grace period over; pulls still in flight are abandoned");
            Ok(())
        }
    };
    watcher.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    let _ = std::fs::remove_file(&args.listen);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => error_exit(&e.to_string()),
    }
}

async fn admission(args: AdmissionArgs) -> ExitCode {
    use crate::admission::{bind, serve, CertFiles, Shim};
    use std::sync::Arc;

    if let Err(e) = args.registry.explicit_credential(None) {
        return error_exit(&e);
    }
    let tls = match CertFiles::open(&args.tls_cert, &args.tls_key) {
        Ok(t) => t,
        Err(e) => return error_exit(&e.to_string()),
    };
    let server_config = match tls.server_config(args.client_ca.as_deref()) {
        Ok(c) => c,
        Err(e) => return error_exit(&e.to_string()),
    };
    let registry = match args.registry.client(None) {
        Ok(r) => r,
        Err(e) => return error_exit(&e),
    };
    let audit = match args.daemon.audit_log(args.audit_log.as_deref()) {
        Ok(a) => a,
        Err(e) => return error_exit(&e.to_string()),
    };
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let audit = audit.with_metrics(metrics.clone());
    // The shim keeps no snapshot on disk: it is stateless, and denies until its first sync.
    let client = match args.cluster.client().await {
        Ok(c) => c,
        Err(e) => return error_exit(&e),
    };
    let pull_secrets = client
        .clone()
        .map(crate::admission::pull_secrets::PullSecrets::new);
    // Cluster mode: project the public keys of CIP key Secrets for the nodes, which read no
    // Secret (see crate::kube::keys).
    let projector = client.clone().map(|c| {
        let namespace = args.scope.settings().controller_namespace;
        tokio::spawn(
            crate::kube::keys::KeyProjector::new(c, namespace, Some(metrics.clone())).run(),
        )
    });
    let (policies, watcher) = match policy_source(
        client,
        &args.policy_dirs,
        args.scope.settings(),
        args.daemon.reload_interval(),
        Duration::from_secs(args.daemon.tuf_refresh_secs.max(1)),
        None,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return error_exit(&e),
    };
    let admin = match start_admin(args.health_listen, policies.clone(), metrics.clone()).await {
        Ok(a) => a,
        Err(e) => return error_exit(&e),
    };
    let listener = match bind(args.listen).await {
        Ok(l) => l,
        Err(e) => return error_exit(&e.to_string()),
    };
    let trust_namespace_selector = pull_secrets.is_some();
    if pull_secrets.is_some() && args.client_ca.is_none() {
        tracing::warn!(
            "no --client-ca: any client that reaches the webhook port can ask for reviews in any \
             namespace, and the shim reads that namespace's imagePullSecrets for them; restrict \
             the port (deploy/admission.yaml's NetworkPolicy) or set --client-ca"
        );
    }
    let shim = Arc::new(Shim {
        engine: crate::engine::Engine {
            policies,
            registry,
            cache: args.daemon.verdict_cache(),
            audit,
            node: args.daemon.node(),
        },
        metrics,
        enforce_by_default: args.enforce_by_default,
        pull_secrets,
        trust_namespace_selector,
        limits: crate::admission::Limits::new(crate::admission::LimitSettings {
            max_reviews: args.max_concurrent_reviews.max(1),
            max_body_bytes_in_flight: args
                .max_inflight_bytes
                .max(crate::admission::MAX_BODY_BYTES),
            max_connections: args.max_connections.max(1),
        }),
    });
    let interval = args.daemon.reload_interval();
    let cert_watcher = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match tls.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate change ignored; the last good pair stays in use")
                }
            }
        }
    });
    let local = listener
        .local_addr()
        .map_or_else(|_| args.listen.to_string(), |a| a.to_string());
    tracing::info!(listen = %local, "pullgate admission serving");
    eprintln!("pullgate: serving admission webhooks on https://{local}");

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };
    let grace = Duration::from_secs(args.daemon.shutdown_grace);
    let server = serve(listener, server_config, shim, stopped(stop.clone()));
    tokio::pin!(server);
    tokio::select! {
        _ = &mut server => {}
        _ = async { stopped(stop).await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown grace period over; reviews still in flight are abandoned");
        }
    }
    watcher.abort();
    cert_watcher.abort();
    if let Some(p) = projector {
        p.abort();
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    ExitCode::SUCCESS
}

/// The policy source of a daemon: the API server (cluster mode) or policy files, with the task
/// that keeps it current. `snapshot_file`: where cluster mode persists what it synced (`None`:
/// nothing persisted; the source denies outside exempt namespaces until its first sync).
async fn policy_source(
    client: Option<::kube::Client>,
    policy_dirs: &[String],
    settings: Settings,
    reload_interval: Duration,
    tuf_refresh: Duration,
    snapshot_file: Option<PathBuf>,
) -> Result<
    (
        std::sync::Arc<dyn crate::policy::source::PolicySource>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    use crate::kube::{ClusterSource, Error as KubeError};
    use crate::policy::source::PolicyDir;
    use std::sync::Arc;

    let Some(client) = client else {
        let paths: Vec<PathBuf> = policy_dirs.iter().map(PathBuf::from).collect();
        // Remote policy sources are fetched by the watch task, not before serving.
        let (policies, problems) = PolicyDir::open_deferred(paths, settings).await;
        let policies = policies.with_tuf_refresh(tuf_refresh);
        for p in &problems {
            tracing::error!(problem = %p, "policy problem: images it concerns are denied until it is fixed");
        }
        let policies = Arc::new(policies);
        let watcher = tokio::spawn(policies.clone().watch(reload_interval));
        return Ok((policies, watcher));
    };
    // The API server lists every namespace: one the snapshot does not know yet is one the
    // snapshot lags behind on, and is enforced until it is known.
    let settings = Settings {
        enforce_unknown_namespaces: true,
        ..settings
    };
    let (source, problem) = ClusterSource::open(settings, snapshot_file);
    let source = source.with_tuf_refresh(tuf_refresh);
    match problem {
        Some(e @ KubeError::NoSnapshot(_)) => {
            tracing::warn!(problem = %e, "no policy snapshot on disk")
        }
        Some(e @ KubeError::NotSynced) => tracing::info!(state = %e, "waiting for the API server"),
        Some(e) => tracing::error!(problem = %e, "policy snapshot unusable"),
        None => tracing::info!(
            fingerprint = source.current().fingerprint(),
            "enforcing the persisted policy snapshot until the API server answers"
        ),
    }
    let source = Arc::new(source);
    let watcher = tokio::spawn(source.clone().run(client));
    Ok((source, watcher))
}

/// Starts the admin listener (`/livez`, `/readyz`, `/metrics`) when one is configured.
async fn start_admin(
    listen: HealthListen,
    policies: std::sync::Arc<dyn crate::policy::source::PolicySource>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    let Some(addr) = listen.0 else {
        return Ok(None);
    };
    let listener = crate::metrics::bind_admin(addr).await?;
    let local = listener.local_addr().map_or(addr, |a| a);
    tracing::info!(listen = %local, "admin listener serving /livez, /readyz, /metrics");
    eprintln!("pullgate: health and metrics on http://{local}");
    Ok(Some(tokio::spawn(crate::metrics::serve_admin(
        listener,
        policies,
        metrics,
        std::future::pending(),
    ))))
}

/// SIGTERM (systemd stop) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exempt(args: &[&str]) -> Vec<String> {
        let mut argv = vec!["pullgate", "validate", "x.yaml"];
        argv.extend(args);
        let Command::Validate(v) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not validate");
        };
        v.scope.settings().exempt_namespaces.into_iter().collect()
    }

    #[test]
    fn exempt_namespaces_add_to_kube_system_unless_told_otherwise() {
        assert_eq!(exempt(&[]), ["kube-system"]);
        assert_eq!(
            exempt(&["--exempt-namespace", "monitoring"]),
            ["kube-system", "monitoring"]
        );
        assert_eq!(
            exempt(&[
                "--no-default-exemptions",
                "--exempt-namespace",
                "monitoring"
            ]),
            ["monitoring"]
        );
        assert!(exempt(&["--no-default-exemptions"]).is_empty());
    }
}
