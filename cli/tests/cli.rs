//! The `switchyard` binary end to end: make-tiny, generate (single process) and their errors.

use std::path::Path;
use std::process::{Command, Output};

fn switchyard(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_CACHE_DIR", cache)
        .env_remove("SWITCHYARD_MODEL")
        .output()
        .expect("switchyard runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn make_tiny_then_generate_writes_the_documented_json() {
    let work = tempfile::tempdir().expect("tempdir");
    let model = work.path().join("tiny");
    let model_arg = model.to_str().expect("utf-8 path");
    let made = switchyard(&["make-tiny", "--out", model_arg, "--seed", "3"], work.path());
    assert!(made.status.success(), "make-tiny failed: {}", stderr(&made));
    for file in ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(model.join(file).is_file(), "{file} missing");
    }

    let json_path = work.path().join("out.json");
    let out = switchyard(
        &[
            "generate",
            "--model",
            model_arg,
            "--prompt",
            "Hello switchyard",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--output-json",
            json_path.to_str().expect("utf-8"),
        ],
        work.path(),
    );
    assert!(out.status.success(), "generate failed: {}", stderr(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written")).expect("valid json");
    let prompt = json["prompt_ids"].as_array().expect("prompt_ids");
    let vocab = json["prompt_logits"][0].as_array().expect("prompt_logits").len();
    assert!(vocab > 256);
    assert_eq!(json["prompt_logits"].as_array().expect("rows").len(), prompt.len());
    assert_eq!(json["decode_logits"].as_array().expect("decode").len(), 5);
    assert_eq!(json["greedy_tokens"].as_array().expect("tokens").len(), 5);
    assert!(json["text"].is_string());
    // decode_logits[0] chose the first token, so it is the last prompt position's logits.
    assert_eq!(json["decode_logits"][0], json["prompt_logits"][prompt.len() - 1]);

    // Same flags, same output: generation is deterministic.
    let again = work.path().join("again.json");
    let out = switchyard(
        &[
            "generate",
            "--model",
            model_arg,
            "--prompt",
            "Hello switchyard",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--output-json",
            again.to_str().expect("utf-8"),
        ],
        work.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let second: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&again).expect("json")).expect("json");
    assert_eq!(json["greedy_tokens"], second["greedy_tokens"]);
}

#[test]
fn generate_without_a_model_builds_the_builtin_one_once() {
    let cache = tempfile::tempdir().expect("tempdir");
    let first =
        switchyard(&["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--ignore-eos"], cache.path());
    assert!(first.status.success(), "{}", stderr(&first));
    let builtin = std::fs::read_dir(cache.path()).expect("cache dir").count();
    assert_eq!(builtin, 1, "exactly one built-in model directory, no staging leftovers");
    let second =
        switchyard(&["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--ignore-eos"], cache.path());
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(first.stdout, second.stdout);
}

#[test]
fn bad_input_gets_a_clear_error_not_a_panic() {
    let cache = tempfile::tempdir().expect("tempdir");
    let out = switchyard(&["generate", "--prompt-ids", "1,999999", "--max-new-tokens", "2"], cache.path());
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(message.contains("999999") && message.contains("vocab"), "{message}");
    assert!(!message.contains("panicked"), "{message}");

    let out = switchyard(&["generate", "--model", "/nonexistent/model", "--prompt-ids", "1"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/model"), "{}", stderr(&out));

    let out = switchyard(&["generate", "--prompt-ids", "1", "--device", "cuda:0"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cuda"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    let out = switchyard(&["generate", "--prompt-ids", "1", "--device", "tpu"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("tpu"), "{}", stderr(&out));

    // The attention side on a GPU: refused before anything is bound or loaded, naming the flag (this machine has
    // no GPU; a `cuda` build names the missing library instead of the missing feature).
    for args in [
        &["attention-worker", "--device", "cuda:0", "--expert-workers", "e0=http://127.0.0.1:1"][..],
        &["up", "--attention-device", "cuda:0"][..],
    ] {
        let out = switchyard(args, cache.path());
        assert!(!out.status.success(), "{args:?}");
        let message = stderr(&out);
        assert!(message.contains("cuda:0") && !message.contains("panicked"), "{args:?}: {message}");
    }
    for args in [
        &["attention-worker", "--dense-dtype", "f32", "--expert-workers", "e0=http://127.0.0.1:1"][..],
        &["up", "--dense-dtype", "f32"][..],
    ] {
        let out = switchyard(args, cache.path());
        assert!(!out.status.success(), "{args:?}");
        let message = stderr(&out);
        assert!(message.contains("--dense-dtype") && message.contains("cuda:N"), "{args:?}: {message}");
    }
}

/// `--kv-dtype` chooses a GPU's KV cache: on the CPU (whose cache is f32) every command refuses it before binding or
/// loading anything, naming the flag; a value that is no KV dtype is refused naming the value.
#[test]
fn kv_dtype_is_refused_on_the_cpu() {
    let cache = tempfile::tempdir().expect("tempdir");
    for args in [
        &["attention-worker", "--kv-dtype", "bf16", "--expert-workers", "e0=http://127.0.0.1:1"][..],
        &["generate", "--prompt-ids", "1", "--kv-dtype", "f32"][..],
        &["up", "--kv-dtype", "bf16"][..],
    ] {
        let out = switchyard(args, cache.path());
        assert!(!out.status.success(), "{args:?}");
        let message = stderr(&out);
        assert!(message.contains("--kv-dtype") && message.contains("cuda:N"), "{args:?}: {message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
    let out = switchyard(&["generate", "--prompt-ids", "1", "--device", "cuda:0", "--kv-dtype", "fp8"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("\"fp8\""), "{}", stderr(&out));
}

#[test]
fn generate_sampling_controls_logprobs_and_stop() {
    let cache = tempfile::tempdir().expect("tempdir");
    let json_of = |extra: &[&str]| {
        let path = cache.path().join("out.json");
        let mut args = vec!["generate", "--prompt", "Hello switchyard", "--max-new-tokens", "6", "--ignore-eos"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output-json", path.to_str().expect("utf-8")]);
        let out = switchyard(&args, cache.path());
        assert!(out.status.success(), "generate {extra:?} failed: {}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&path).expect("json")).expect("json")
    };
    let plain = json_of(&[]);
    assert!(plain.get("logprobs").is_none(), "logprobs only when asked for");
    let with = json_of(&["--logprobs", "3", "--min-p", "0.1"]);
    let logprobs = with["logprobs"].as_array().expect("logprobs");
    assert_eq!(logprobs.len(), 6);
    for (entry, token) in logprobs.iter().zip(with["greedy_tokens"].as_array().expect("tokens")) {
        assert_eq!(&entry["id"], token);
        assert_eq!(entry["top"].as_array().expect("top").len(), 3);
        assert_eq!(entry["top"][0]["id"], *token, "greedy picks the most likely");
    }
    // A stop string taken from the text: the text is cut where it starts.
    let text = plain["text"].as_str().expect("text");
    let stop: String = text.chars().skip(text.chars().count() / 2).take(2).collect();
    if !stop.trim().is_empty() {
        let stopped = json_of(&["--stop", &stop]);
        assert_eq!(stopped["finish_reason"], "stop");
        assert_eq!(stopped["text"].as_str().expect("text"), &text[..text.find(stop.as_str()).expect("in text")]);
    }
    let out = switchyard(&["generate", "--prompt-ids", "1,2", "--min-p", "1.5"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("min_p"), "{}", stderr(&out));
    let out = switchyard(&["generate", "--prompt-ids", "1,2", "--logprobs", "21"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("logprobs") && stderr(&out).contains("20"), "{}", stderr(&out));
}
