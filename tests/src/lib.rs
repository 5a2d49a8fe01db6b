//! Cross-process integration tests of Switchyard, and the harness they share.
//!
//! The tests in `tests/tests/` drive the real `switchyard` binary: [`Cluster`] starts `switchyard up` (which starts
//! the coordinator, attention and expert workers as processes on loopback), reads its `started ...` and `ready` lines,
//! and stops everything when dropped. Golden parity fixtures generated with HuggingFace transformers live in
//! `tests/golden/`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `switchyard` binary: `$SWITCHYARD_BIN`, else the one Cargo built next to this test's executable.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHYARD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/switchyard
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let binary = profile_dir.join("switchyard");
    assert!(
        binary.is_file(),
        "{} is missing: build it first (`cargo build -p switchyard-cli`, which `scripts/test.sh` does)",
        binary.display()
    );
    binary
}

/// Runs `switchyard ARGS` to completion.
pub fn switchyard(args: &[&str]) -> Output {
    Command::new(binary()).args(args).env_remove("SWITCHYARD_MODEL").output().expect("switchyard runs")
}

/// Writes the tiny FP8 model into `dir` with `seed`.
pub fn make_tiny(dir: &Path, seed: u64) {
    let out = switchyard(&["make-tiny", "--out", dir.to_str().expect("utf-8 path"), "--seed", &seed.to_string(), "--fp8"]);
    assert!(out.status.success(), "make-tiny: {}", String::from_utf8_lossy(&out.stderr));
}

/// A started process of the cluster, as `up` announced it.
#[derive(Debug, Clone)]
pub struct Member {
    /// e.g. `expert worker ew-1`.
    pub role: String,
    /// Its pid.
    pub pid: u32,
    /// Its gRPC endpoint.
    pub endpoint: String,
}

/// A `switchyard up` cluster; stopped (SIGTERM, grace, SIGKILL) when dropped.
pub struct Cluster {
    up: Child,
    /// Every process `up` started.
    pub members: Vec<Member>,
    /// The client endpoint from the `ready` line.
    pub endpoint: String,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `switchyard up ARGS` and waits (up to 120 s) for its `ready` line.
    pub fn start(args: &[&str]) -> Cluster {
        let stderr_dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = stderr_dir.path().join("up.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut up = Command::new(binary())
            .arg("up")
            .args(args)
            .env_remove("SWITCHYARD_MODEL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("switchyard up starts");
        let stdout = up.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut cluster = Cluster {
            up,
            members: Vec::new(),
            endpoint: String::new(),
            lines,
            stderr_path,
            _stderr_dir: stderr_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match cluster.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(member) = parse_started(&line) {
                        cluster.members.push(member);
                    } else if let Some(rest) = line.strip_prefix("ready: client endpoint ") {
                        cluster.endpoint = rest.split_whitespace().next().unwrap_or_default().to_string();
                        return cluster;
                    }
                }
                Err(_) => panic!("switchyard up did not become ready; stderr:\n{}", cluster.stderr()),
            }
        }
    }

    /// What `up` and its children wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The member whose role ends with `name` (e.g. `ew-1`, `aw-0`).
    pub fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.role.ends_with(name)).unwrap_or_else(|| panic!("no member {name}"))
    }

    /// Endpoints of the attention workers.
    pub fn attention_endpoints(&self) -> Vec<String> {
        self.members.iter().filter(|m| m.role.starts_with("attention")).map(|m| m.endpoint.clone()).collect()
    }

    /// Sends `signal` to a member process.
    pub fn signal(&self, name: &str, signal: i32) {
        let pid = self.member(name).pid as libc::pid_t;
        // SAFETY: plain kill(2) on a pid the cluster started.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Whether a member process still runs.
    pub fn is_alive(&self, name: &str) -> bool {
        let pid = self.member(name).pid as libc::pid_t;
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    /// Whether `up` itself still runs.
    pub fn up_is_running(&mut self) -> bool {
        matches!(self.up.try_wait(), Ok(None))
    }
}

fn parse_started(line: &str) -> Option<Member> {
    // "started expert worker ew-0 (pid 123) at http://127.0.0.1:4567"
    let rest = line.strip_prefix("started ")?;
    let (role, rest) = rest.split_once(" (pid ")?;
    let (pid, rest) = rest.split_once(") at ")?;
    Some(Member { role: role.to_string(), pid: pid.parse().ok()?, endpoint: rest.trim().to_string() })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: signalling the child we spawned.
        unsafe {
            libc::kill(self.up.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.up.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.up.kill();
        let _ = self.up.wait();
    }
}

/// A generation's `--output-json`, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid json")
}

/// Largest absolute difference between two equally shaped JSON arrays of float rows.
pub fn max_abs_diff(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let rows_a = a.as_array().expect("rows");
    let rows_b = b.as_array().expect("rows");
    assert_eq!(rows_a.len(), rows_b.len(), "row counts differ");
    let mut max: f64 = 0.0;
    for (ra, rb) in rows_a.iter().zip(rows_b) {
        let (ra, rb) = (ra.as_array().expect("row"), rb.as_array().expect("row"));
        assert_eq!(ra.len(), rb.len(), "row lengths differ");
        for (x, y) in ra.iter().zip(rb) {
            max = max.max((x.as_f64().expect("float") - y.as_f64().expect("float")).abs());
        }
    }
    max
}
