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
    let out =
        switchyard(&["make-tiny", "--out", dir.to_str().expect("utf-8 path"), "--seed", &seed.to_string(), "--fp8"]);
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
    /// The cluster store's URL from the `ready` line (the coordinator's, or the etcd cluster's).
    pub store: String,
    /// The OpenAI-compatible HTTP endpoint from the `ready` line, when `up` was given `--http`.
    pub http: Option<String>,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
    _stderr_dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `switchyard up ARGS` and waits (up to 120 s) for its `ready` line.
    pub fn start(args: &[&str]) -> Cluster {
        Self::try_start(args).unwrap_or_else(|stderr| panic!("switchyard up did not become ready; stderr:\n{stderr}"))
    }

    /// Like [`Cluster::start`], but gives back what `up` wrote to stderr when it does not become ready (it failed).
    pub fn try_start(args: &[&str]) -> Result<Cluster, String> {
        let stderr_dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = stderr_dir.path().join("up.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut up = Command::new(binary())
            .arg("up")
            .args(args)
            .env_remove("SWITCHYARD_MODEL")
            // What the tests read from the log: placement changes and expert loads and unloads.
            .env("SWITCHYARD_LOG", "warn,switchyard_coordinator=info,switchyard_expert_worker=info")
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
            store: String::new(),
            http: None,
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
                        cluster.store = rest
                            .split_once("(store ")
                            .and_then(|(_, r)| r.split(';').next())
                            .unwrap_or_default()
                            .to_string();
                        cluster.http = rest
                            .split_once("; http ")
                            .and_then(|(_, r)| r.split([';', ')']).next())
                            .map(|url| url.trim().to_string());
                        return Ok(cluster);
                    }
                }
                Err(_) => {
                    // Give `up` a moment to finish writing why it stopped.
                    let _ = cluster.wait_exit(Duration::from_secs(10));
                    return Err(cluster.stderr());
                }
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

    /// Waits up to `limit` for `up` to exit; its status, if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.up.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
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

/// A prompt long enough that routing reaches every expert of the tiny model in both MoE layers.
pub fn prompt_ids() -> String {
    (0..96u32).map(|i| ((i * 37 + 11) % 480).to_string()).collect::<Vec<_>>().join(",")
}

/// Greedy generation of `max_new_tokens` for [`prompt_ids`] in one process (no cluster), as `--output-json`.
pub fn single_process(model: &Path, out: &Path, fp8_activations: bool, max_new_tokens: u32) -> serde_json::Value {
    let ids = prompt_ids();
    let tokens = max_new_tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        &tokens,
        "--ignore-eos",
        "--output-json",
        out.to_str().expect("utf-8"),
    ];
    if fp8_activations {
        args.push("--fp8-activations");
    }
    let output = switchyard(&args);
    assert!(output.status.success(), "single-process generate: {}", String::from_utf8_lossy(&output.stderr));
    read_json(out)
}

/// `len` token ids below the tiny vocabulary: a prompt as long as a test needs (context parallelism).
pub fn long_prompt(len: u32) -> String {
    (0..len).map(|i| ((i * 37 + 11) % 480).to_string()).collect::<Vec<_>>().join(",")
}

/// `switchyard generate` with `args` (`--model DIR` or `--endpoint URL`), greedy, writing `--output-json` to `out`.
pub fn generate(args: &[&str], prompt: &str, max_new_tokens: u32, out: &Path) -> Output {
    let tokens = max_new_tokens.to_string();
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.extend(["--prompt-ids", prompt, "--max-new-tokens", &tokens, "--ignore-eos"]);
    all.extend(["--output-json", out.to_str().expect("utf-8")]);
    switchyard(&all)
}

/// The same generation of 8 tokens through a cluster's client endpoint.
pub fn through(endpoint: &str, out: &Path) -> serde_json::Value {
    let output = generate_through(endpoint, out, 8);
    assert!(output.status.success(), "generate --endpoint {endpoint}: {}", String::from_utf8_lossy(&output.stderr));
    read_json(out)
}

/// Runs `switchyard generate --endpoint` for [`prompt_ids`], writing `--output-json` to `out`.
pub fn generate_through(endpoint: &str, out: &Path, max_new_tokens: u32) -> Output {
    switchyard(&[
        "generate",
        "--endpoint",
        endpoint,
        "--prompt-ids",
        &prompt_ids(),
        "--max-new-tokens",
        &max_new_tokens.to_string(),
        "--ignore-eos",
        "--output-json",
        out.to_str().expect("utf-8"),
    ])
}

/// Asserts that a generation equals the reference: same prompt, same greedy tokens, logits within 1e-5.
pub fn assert_equivalent(name: &str, reference: &serde_json::Value, got: &serde_json::Value) {
    assert_eq!(got["prompt_ids"], reference["prompt_ids"], "{name}: prompt ids");
    assert_eq!(got["greedy_tokens"], reference["greedy_tokens"], "{name}: greedy tokens");
    let prompt = max_abs_diff(&got["prompt_logits"], &reference["prompt_logits"]);
    let decode = max_abs_diff(&got["decode_logits"], &reference["decode_logits"]);
    println!("{name}: max |diff| prompt logits {prompt:e}, decode logits {decode:e}");
    assert!(prompt <= 1e-5 && decode <= 1e-5, "{name}: logits differ by {prompt} / {decode}");
}

/// Generations run back to back by background clients until [`Traffic::finish`]: load on a cluster while something
/// else happens to it (a rebalance, a killed worker).
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<std::thread::JoinHandle<Vec<(PathBuf, Output)>>>,
}

impl Traffic {
    /// One client per endpoint in `endpoints`, each generating `max_new_tokens` for [`prompt_ids`] again and again,
    /// writing each `--output-json` under `dir`.
    pub fn start(endpoints: &[String], dir: &Path, max_new_tokens: u32) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = endpoints
            .iter()
            .enumerate()
            .map(|(client, endpoint)| {
                let (stop, endpoint, dir) = (stop.clone(), endpoint.clone(), dir.to_path_buf());
                std::thread::spawn(move || {
                    let mut runs = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let out = dir.join(format!("traffic-{client}-{}.json", runs.len()));
                        let output = generate_through(&endpoint, &out, max_new_tokens);
                        runs.push((out, output));
                    }
                    runs
                })
            })
            .collect();
        Traffic { stop, clients }
    }

    /// Lets every client finish the generation it is in, then returns every run: its `--output-json` path and how
    /// the client exited.
    pub fn finish(self) -> Vec<(PathBuf, Output)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.clients.into_iter().flat_map(|c| c.join().expect("traffic client thread")).collect()
    }
}

/// Runs `switchyard placement show --store URL` and returns its stdout (the table and the coordinator's status).
pub fn placement_show(store: &str) -> String {
    let output = switchyard(&["placement", "show", "--store", store]);
    assert!(output.status.success(), "placement show: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The first number after `epoch ` in `text`.
pub fn epoch_in(text: &str) -> Option<u64> {
    let rest = &text[text.find("epoch ")? + "epoch ".len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Sends one HTTP/1.1 request to `url` (`http://HOST:PORT`) and returns the status code and the body.
pub fn http_request(url: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("read timeout");
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("send the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
