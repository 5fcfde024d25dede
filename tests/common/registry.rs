//! A real distribution 2.8 registry (`docker-registry serve`) on loopback, one per test.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// Credentials every `start_with_htpasswd` registry accepts when given this password: the bcrypt
/// hash below was made once (cost 4, so each authenticated request stays cheap) because no bcrypt
/// implementation is available to the tests.
pub const TEST_USER: &str = "pullgate";
/// See [`TEST_USER`].
pub const TEST_PASSWORD: &str = "pullgate-test-pass";
const TEST_PASSWORD_BCRYPT: &str = "$2b$04$ozQ1qnLWLC8pu6.S5qsyPuxJ5a3oFMKJKrkvXnnxn6idImH.8mrrK";

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `docker-registry` child process with its storage, config and logs in a temp dir.
///
/// Killed on [`Registry::stop`] and on drop. Plain HTTP on `127.0.0.1:<port>`.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    pub(super) credentials: Option<(String, String)>,
}

/// One HTTP request as the registry's access log recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

/// A raw HTTP response from [`Registry::http`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Registry {
    /// Starts an anonymous registry and waits until `GET /v2/` answers.
    pub async fn start() -> Registry {
        Self::launch(None).await
    }

    /// Starts a registry that requires HTTP basic auth (htpasswd) over plain HTTP.
    ///
    /// `pass` must be [`TEST_PASSWORD`] (its bcrypt hash is built in), unless the `htpasswd`
    /// tool (apache2-utils) is installed, in which case any password works. Any `user` works.
    /// Every helper on the returned registry authenticates with these credentials.
    pub async fn start_with_htpasswd(user: &str, pass: &str) -> Registry {
        Self::launch(Some((user.to_string(), pass.to_string()))).await
    }

    async fn launch(credentials: Option<(String, String)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("pullgate-registry-")
            .tempdir()
            .expect("registry temp dir");
        fs::create_dir_all(dir.path().join("data")).expect("registry storage dir");
        if let Some((user, pass)) = &credentials {
            let line = htpasswd_line(user, pass);
            fs::write(dir.path().join("htpasswd"), line).expect("write htpasswd");
        }
        let mut dir = dir;
        let mut last_err = String::new();
        // The free port is found by binding and releasing it; another process may grab it in
        // between, so a failed start is retried on a new port.
        for _ in 0..3 {
            let port = free_port();
            let mut reg = Registry {
                dir,
                port,
                child: None,
                credentials: credentials.clone(),
            };
            reg.write_config();
            match reg.spawn_and_wait().await {
                Ok(()) => return reg,
                Err(e) => {
                    last_err = e;
                    reg.stop();
                    dir = reg.take_dir();
                }
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.stop();
        // Swap in a dummy so Drop has something to clean; the real dir is handed back.
        let dummy = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, dummy)
    }

    fn write_config(&self) {
        let root = self.dir.path().join("data");
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: pullgate-test-secret\n",
            root = root.display(),
            port = self.port,
        );
        if self.credentials.is_some() {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: pullgate-test\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ));
        }
        fs::write(self.config_path(), config).expect("write registry config");
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        // Ours is listening once *its* log says so (the log is appended across restarts, so
        // count): a probe alone could be answered by another test's registry that took the port.
        let listening = format!("listening on {}", self.addr());
        let before = self.stderr_log().matches(&listening).count();
        // stdout carries the access log (one line per request), stderr the application log.
        let access = append(&self.access_log_path());
        let errlog = append(&self.stderr_log_path());
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(access)
            .stderr(errlog)
            .spawn()
            .map_err(|e| format!("cannot run docker-registry: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "docker-registry exited with {status}\n{}",
                    self.stderr_log()
                ));
            }
            if self.stderr_log().matches(&listening).count() > before && self.probe() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no answer on {} within {READY_TIMEOUT:?}\n{}",
                    self.addr(),
                    self.stderr_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Any HTTP answer to `GET /v2/` (401 included) means the registry is serving.
    fn probe(&self) -> bool {
        raw_http(&self.addr(), "GET", "/v2/", &[], &[])
            .map(|r| r.status > 0)
            .unwrap_or(false)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `127.0.0.1:PORT/REPO:TAG`.
    pub fn tag_ref(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr())
    }

    /// `127.0.0.1:PORT/REPO@DIGEST`.
    pub fn digest_ref(&self, repo: &str, digest: &str) -> String {
        format!("{}/{repo}@{digest}", self.addr())
    }

    /// `Some((user, password))` for an htpasswd registry.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The temp dir holding config, storage (`data/`) and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    fn stderr_log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The registry's application log (stderr), for failure messages.
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(self.stderr_log_path()).unwrap_or_default()
    }

    /// True while the child process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the registry (SIGKILL) and reaps it. Storage and logs stay; idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts the registry again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait().await {
            self.stop();
            panic!("docker-registry did not restart: {e}");
        }
    }

    /// One HTTP/1.0 request to the registry with the registry's credentials (if any), for
    /// checks the OCI client does not offer. `headers` are extra request headers.
    pub fn http(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        let mut all: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some((u, p)) = &self.credentials {
            all.push((
                "Authorization".into(),
                format!("Basic {}", B64.encode(format!("{u}:{p}"))),
            ));
        }
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        raw_http(&self.addr(), method, path, &refs, &[])
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.addr()))
    }

    /// One HTTP/1.0 request without credentials (to see what an anonymous client gets).
    pub fn http_anonymous(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> HttpResponse {
        raw_http(&self.addr(), method, path, headers, &[])
            .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", self.addr()))
    }

    /// Every request the registry has logged so far, in order (including the readiness probes
    /// and any requests of the harness itself).
    ///
    /// The access-log line is written just after the response is sent, so this waits until the
    /// log has been quiet for 30 ms before reading it.
    pub async fn requests(&self) -> Vec<Request> {
        let path = self.access_log_path();
        let mut last = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let now = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if now == last {
                break;
            }
            last = now;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        text.lines().filter_map(parse_access_line).collect()
    }

    /// Number of requests logged so far; use as a mark for [`Registry::requests_since`].
    pub async fn request_count(&self) -> usize {
        self.requests().await.len()
    }

    /// `(method, uri)` of every request logged after `mark` (a [`Registry::request_count`]).
    pub async fn requests_since(&self, mark: usize) -> Vec<(String, String)> {
        self.requests_with_status_since(mark)
            .await
            .into_iter()
            .map(|r| (r.method, r.uri))
            .collect()
    }

    /// Like [`Registry::requests_since`], with the response status.
    pub async fn requests_with_status_since(&self, mark: usize) -> Vec<Request> {
        self.requests().await.into_iter().skip(mark).collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn htpasswd_line(user: &str, pass: &str) -> String {
    if pass == TEST_PASSWORD {
        return format!("{user}:{TEST_PASSWORD_BCRYPT}\n");
    }
    // `htpasswd -nbB -C 4 USER PASS` prints `USER:$2y$04$...`.
    match Command::new("htpasswd")
        .args(["-nbB", "-C", "4", user, pass])
        .output()
    {
        Ok(out) if out.status.success() => {
            String::from_utf8_lossy(&out.stdout).trim().to_string() + "\n"
        }
        _ => panic!(
            "start_with_htpasswd: only the password TEST_PASSWORD is supported without the \
             `htpasswd` tool (no bcrypt implementation available to the tests)"
        ),
    }
}

/// Parses one Apache combined-log line as distribution's access log writes it:
/// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"`.
fn parse_access_line(line: &str) -> Option<Request> {
    let start = line.find('"')?;
    let rest = &line[start + 1..];
    let end = rest.find('"')?;
    let mut request = rest[..end].split(' ');
    let method = request.next()?.to_string();
    let uri = request.next()?.to_string();
    let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some(Request {
        method,
        uri,
        status,
    })
}

/// A minimal HTTP/1.0 client (the server closes the connection, so the body runs to EOF).
pub(super) fn raw_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, String> {
    let sock_addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&sock_addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream
        .write_all(req.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "no end of headers".to_string())?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}
