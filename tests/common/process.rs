//! Child processes with a deadline: `pullgate` and `skopeo` runs.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished child process left behind.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code; `-1` when the process was ended by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Default deadline for one child process.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr.
///
/// Panics when the process cannot be started or runs past `timeout` (it is killed first, and the
/// panic message carries what it printed so far).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    // Drain both pipes on their own threads so a chatty child never blocks on a full pipe.
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                // Only this child, by its own handle.
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out.join().unwrap_or_default();
                let stderr = err.join().unwrap_or_default();
                panic!(
                    "{shown} ran longer than {timeout:?}; killed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
                );
            }
            Ok(None) => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Path of the `pullgate` binary Cargo built for this test run, or `PULLGATE_TEST_BIN` when
/// set (worktrees sharing one `CARGO_TARGET_DIR` share its `target/debug/pullgate` too).
pub fn pullgate_bin() -> std::path::PathBuf {
    std::env::var_os("PULLGATE_TEST_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_pullgate")))
}

/// Runs `pullgate ARGS` with a throwaway `HOME` (and `DOCKER_CONFIG`) so no real registry
/// credentials leak in, `RUST_LOG` removed, stdin closed, and a 60 s deadline.
///
/// Blocking: from an async test prefer [`run_pullgate_async`] when something in the same
/// runtime must keep running meanwhile.
pub fn run_pullgate(args: &[&str]) -> Output {
    run_pullgate_with(args, &[])
}

/// Like [`run_pullgate`], with extra environment variables applied last (so they may override
/// `HOME`, `DOCKER_CONFIG` or set `RUST_LOG`).
pub fn run_pullgate_with(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().expect("temp HOME");
    let cmd = pullgate_command(home.path(), args, envs);
    run_with_timeout(cmd, DEFAULT_TIMEOUT)
}

/// [`run_pullgate_with`] on a blocking thread, for async tests.
pub async fn run_pullgate_async(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_pullgate_with(&args, &envs)
    })
    .await
    .expect("pullgate runner thread panicked")
}

/// The `Command` [`run_pullgate_with`] runs, for tests that need to spawn the binary themselves
/// (for example a long-running daemon).
pub fn pullgate_command(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(pullgate_bin());
    cmd.args(args)
        .env("HOME", home)
        .env("DOCKER_CONFIG", home.join(".docker"))
        .env("REGISTRY_AUTH_FILE", home.join("auth.json"))
        .env("XDG_RUNTIME_DIR", home)
        .env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}
