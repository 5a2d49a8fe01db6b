//! Context parallelism end to end: three attention workers of `switchyard up`, each with a KV cache too small for a
//! 3000-token sequence, hold it together; the output equals the single-process run. A member killed mid-sequence
//! fails that request with an error naming it, other requests go on, and once the member is gone a sequence the
//! remaining workers cannot hold is refused with both numbers.

use std::time::{Duration, Instant};

use switchyard_tests::{generate, long_prompt as prompt, make_tiny, max_abs_diff, read_json, Cluster};

#[test]
fn a_sequence_spread_over_three_attention_workers_equals_the_single_process_run() {
    let started = Instant::now();
    let model = tempfile::tempdir().expect("tempdir");
    make_tiny(model.path(), 11);
    let model_dir = model.path().to_str().expect("utf-8");
    // 1 MiB holds 128 blocks of 16 positions of the tiny model's f32 KV: the owner keeps room for its chunked layers
    // and ~368 global positions, each other worker ~2048, so 3008 positions need all three.
    let cluster = Cluster::start(&[
        "--model",
        model_dir,
        "--attention-workers",
        "3",
        "--expert-workers",
        "1",
        "--kv-memory",
        "1MiB",
    ]);
    let work = tempfile::tempdir().expect("tempdir");
    let long = prompt(3000);

    let reference = work.path().join("reference.json");
    let output = generate(&["--model", model_dir], &long, 8, &reference);
    assert!(output.status.success(), "single process: {}", String::from_utf8_lossy(&output.stderr));
    let spread = work.path().join("spread.json");
    let output = generate(&["--endpoint", &cluster.endpoint], &long, 8, &spread);
    assert!(output.status.success(), "through the cluster: {}", String::from_utf8_lossy(&output.stderr));
    let (reference, spread) = (read_json(&reference), read_json(&spread));
    assert_eq!(spread["greedy_tokens"], reference["greedy_tokens"], "greedy tokens");
    let prompt_diff = max_abs_diff(&spread["prompt_logits"], &reference["prompt_logits"]);
    assert!(prompt_diff <= 1e-4, "prompt logits differ by {prompt_diff}");
    let decode_diff = max_abs_diff(&spread["decode_logits"], &reference["decode_logits"]);
    assert!(decode_diff <= 1e-4, "decode logits differ by {decode_diff}");
    println!("3000-token prompt over 3 attention workers: max |diff| prompt {prompt_diff:e}, decode {decode_diff:e}");
    println!("equivalence checked after {:?}", started.elapsed());

    // A generation of 4000 positions, the last ~1600 on aw-2: kill aw-2 while it runs.
    let doomed = {
        let (endpoint, out) = (cluster.endpoint.clone(), work.path().join("doomed.json"));
        std::thread::spawn(move || generate(&["--endpoint", &endpoint], &prompt(2300), 1700, &out))
    };
    cluster.signal("aw-2", libc::SIGKILL);
    let output = doomed.join().expect("the doomed generation");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the generation should fail without its member");
    assert!(stderr.contains("context-parallel member") && stderr.contains("aw-2"), "{stderr}");
    println!("member loss seen after {:?}", started.elapsed());

    // Other requests go on.
    let short = work.path().join("short.json");
    let output = generate(&["--endpoint", &cluster.endpoint], &prompt(96), 8, &short);
    assert!(output.status.success(), "a short request after the kill: {}", String::from_utf8_lossy(&output.stderr));

    // Once aw-2 has left the cluster, 3008 positions no longer fit: refused with both numbers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let output = generate(&["--endpoint", &cluster.endpoint], &long, 8, &work.path().join("refused.json"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() && stderr.contains("does not fit the cluster's KV") {
            assert!(stderr.contains("3008 positions") && stderr.contains("2 attention workers"), "{stderr}");
            break;
        }
        assert!(Instant::now() < deadline, "never refused once aw-2 left: {stderr}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
