//! The checkpoint fingerprint cluster members compare: stable for the same files wherever they lie, different when
//! `config.json` or a safetensors header differs, and an error (never a panic) for a damaged checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use switchyard_model::checkpoint::{Checkpoint, INDEX_FILE};
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};
use switchyard_model::ModelError;
use tempfile::TempDir;

fn tiny(seed: u64, fp8: bool) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_checkpoint(dir.path(), &TinySpec { preset: Preset::Tiny, seed, fp8 }, &mut |_, _| {})
        .expect("writing the tiny checkpoint");
    dir
}

fn fingerprint(dir: &Path) -> String {
    Checkpoint::open(dir).expect("opening the checkpoint").fingerprint().expect("fingerprint")
}

/// A copy of every file of `dir` in a new temp dir.
fn copy(dir: &Path) -> TempDir {
    let copy = tempfile::tempdir().expect("temp dir");
    for entry in fs::read_dir(dir).expect("listing the checkpoint") {
        let entry = entry.expect("dir entry");
        fs::copy(entry.path(), copy.path().join(entry.file_name())).expect("copying");
    }
    copy
}

/// The first safetensors file of the checkpoint in `dir`.
fn first_file(dir: &Path) -> PathBuf {
    Checkpoint::open(dir).expect("opening the checkpoint").files()[0].clone()
}

#[test]
fn the_same_files_give_the_same_fingerprint_anywhere() {
    let dir = tiny(1, true);
    let first = fingerprint(dir.path());
    let hex = first.strip_prefix("sha256:").expect("a sha256: prefix");
    assert_eq!(hex.len(), 64, "{first}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{first}");
    assert_eq!(fingerprint(dir.path()), first, "opening again");
    let copy = copy(dir.path());
    assert_eq!(fingerprint(copy.path()), first, "another directory holding the same files");
    let rewritten = tiny(1, true);
    assert_eq!(fingerprint(rewritten.path()), first, "the generator rewrote the same bytes");
}

#[test]
fn a_different_config_header_or_weights_give_another_fingerprint() {
    let dir = tiny(1, true);
    let original = fingerprint(dir.path());
    assert_ne!(fingerprint(tiny(1, false).path()), original, "BF16 fused experts instead of FP8 ones");
    // Same layout, same headers, other weights: the sampled tensor data tells them apart.
    assert_ne!(fingerprint(tiny(2, true).path()), original, "another seed's weights");

    // One value of config.json changed.
    let edited = copy(dir.path());
    let config_path = edited.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(&config_path).expect("reading config.json")).expect("config.json is JSON");
    let text = &mut config["text_config"];
    let theta = text.get("rope_theta").and_then(serde_json::Value::as_f64).expect("rope_theta in config.json");
    text["rope_theta"] = serde_json::json!(theta * 2.0);
    fs::write(&config_path, serde_json::to_vec_pretty(&config).expect("serialising")).expect("writing config.json");
    assert_ne!(fingerprint(edited.path()), original, "rope_theta changed");

    // No config.json at all: the headers alone, which still differs from headers plus config.
    fs::remove_file(&config_path).expect("removing config.json");
    let headers_only = fingerprint(edited.path());
    assert_ne!(headers_only, original);

    // One tensor renamed in place (and in the shard index): same file length, same data, different header.
    let renamed = copy(dir.path());
    let file = first_file(renamed.path());
    let mut bytes = fs::read(&file).expect("reading the safetensors file");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let name = Checkpoint::open(renamed.path())
        .expect("opening")
        .tensors()
        .filter(|t| t.file == file)
        .map(|t| t.name.clone())
        .min()
        .expect("a tensor in the first file");
    let new_name = format!("{}X", &name[..name.len() - 1]);
    let (needle, replacement) = (format!("{name}\""), format!("{new_name}\""));
    let header = &bytes[8..8 + header_len];
    let hits: Vec<usize> =
        header.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle.as_bytes()).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{name} once in the header");
    bytes[8 + hits[0]..8 + hits[0] + replacement.len()].copy_from_slice(replacement.as_bytes());
    fs::write(&file, &bytes).expect("writing the renamed header");
    let index = renamed.path().join(INDEX_FILE);
    if index.is_file() {
        let text = fs::read_to_string(&index).expect("reading the index");
        fs::write(&index, text.replace(&needle, &replacement)).expect("writing the index");
    }
    let after = Checkpoint::open(renamed.path()).expect("the renamed checkpoint still opens");
    assert!(!after.contains(&name) && after.contains(&new_name), "{name} was renamed");
    assert_ne!(after.fingerprint().expect("fingerprint"), original, "a tensor renamed in the header");
}

#[test]
fn a_damaged_checkpoint_is_an_error_not_a_panic() {
    let dir = tiny(1, true);
    let file = first_file(dir.path());
    let full = fs::read(&file).expect("reading the safetensors file");
    let header_len = u64::from_le_bytes(full[..8].try_into().expect("8 bytes")) as usize;
    // Cut in the data, in the header, in the length prefix, and to nothing.
    for keep in [full.len() - 1, 8 + header_len / 2, 4, 0] {
        fs::write(&file, &full[..keep]).expect("truncating");
        match Checkpoint::open(dir.path()).and_then(|c| c.fingerprint()) {
            Err(ModelError::Truncated { file: named, .. }) | Err(ModelError::BadHeader { file: named, .. }) => {
                assert_eq!(named, file, "the error names the damaged file (cut at {keep})");
            }
            other => panic!("cut at {keep} of {}: {other:?}", full.len()),
        }
    }
    fs::write(&file, &full).expect("restoring");

    // An unreadable config.json fails the fingerprint with an I/O error naming it.
    let config = dir.path().join("config.json");
    fs::remove_file(&config).expect("removing config.json");
    fs::create_dir(&config).expect("a directory where config.json was");
    match Checkpoint::open(dir.path()).expect("the tensors are intact").fingerprint() {
        Err(ModelError::Io { path, .. }) => assert_eq!(path, config),
        other => panic!("{other:?}"),
    }
}
