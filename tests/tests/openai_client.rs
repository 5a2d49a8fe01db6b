//! The official `openai` Python client against `switchyard up --http` (the built-in tiny model): a completion, a
//! streamed chat completion and errors, then 64 concurrent streams each equal to its solo run with the same seed.
//!
//! The checks are in `tests/python/openai_client_test.py` (plain unittest); each test here starts a cluster and runs
//! one of its test cases with the python of the venv that `scripts/python-client.sh` makes (the openai client at a
//! pinned version). `scripts/test.sh` makes it first and passes it as `$SWITCHYARD_TEST_PYTHON`; a plain `cargo test`
//! runs the script itself, so these tests never skip: without Python or PyPI they fail saying what is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_tests::{http_request, Cluster};

/// Longest a Python test case may run before it counts as hung (it normally takes seconds).
const PYTHON_LIMIT: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate sits in the workspace").to_path_buf()
}

/// The python with the pinned openai client: `$SWITCHYARD_TEST_PYTHON`, else the one `scripts/python-client.sh`
/// makes (or finds already made).
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("SWITCHYARD_TEST_PYTHON").filter(|p| !p.is_empty()) {
        let python = PathBuf::from(python);
        assert!(
            python.is_file(),
            "SWITCHYARD_TEST_PYTHON={} is not a file: point it at the python that scripts/python-client.sh prints, \
             or unset it to let this test run that script",
            python.display()
        );
        return python;
    }
    let script = repo_root().join("scripts/python-client.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e} (is bash installed?)", script.display()));
    assert!(
        output.status.success(),
        "this test needs the official `openai` Python client, and {} could not install it into a venv (it needs \
         python3 3.10+ with venv, and PyPI reachable the first time):\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default().trim().to_string();
    assert!(Path::new(&path).is_file(), "{} printed {path:?}, not a python's path", script.display());
    PathBuf::from(path)
}

/// Starts `up --http` on the built-in tiny model, runs the Python test case `case` against it, and checks that the
/// server still answers afterwards.
fn run_python_case(case: &str) {
    let python = python();
    let cluster = Cluster::start(&["--expert-workers", "2", "--http", "127.0.0.1:0"]);
    let http = cluster.http.clone().expect("the ready line names the HTTP endpoint");
    let work = tempfile::tempdir().expect("tempdir");
    // Files, not pipes: a pipe nobody reads while we wait would fill up and stall the test.
    let log_path = work.path().join("python.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(&python)
        .arg(repo_root().join("tests/python/openai_client_test.py"))
        .args(["-v", case])
        .env("SWITCHYARD_HTTP_URL", &http)
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
    let deadline = Instant::now() + PYTHON_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for python") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("{log}");
    let status = status.unwrap_or_else(|| {
        panic!("{case} ran past {PYTHON_LIMIT:?}; its output:\n{log}\nthe cluster's stderr:\n{}", cluster.stderr())
    });
    assert!(status.success(), "{case} failed ({status}):\n{log}\nthe cluster's stderr:\n{}", cluster.stderr());
    let (status, body) = http_request(&http, "GET", "/health", None);
    assert_eq!(status, 200, "the server keeps serving after {case}: {body}");
}

/// A completion, a streamed chat completion and error cases (negative max_tokens, a prompt over the context limit, a
/// token outside the vocabulary, invalid JSON) through the real client; each error is `openai.BadRequestError` with
/// a message that says what was wrong, and the server then answers as before.
#[test]
fn openai_python_client_completes_streams_and_gets_clear_errors() {
    run_python_case("OpenAIClientTest");
}

/// 64 streamed requests (completions and chats, different prompts, seeds, temperatures and lengths) run one by one,
/// then all at once through `AsyncOpenAI`: each concurrent stream has the tokens, text and finish reason of its solo
/// run, and logprobs within 1e-3.
#[test]
fn sixty_four_concurrent_streams_equal_their_solo_runs() {
    run_python_case("ConcurrentStreamsTest");
}
