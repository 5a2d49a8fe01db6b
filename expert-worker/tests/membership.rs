//! An expert worker joining a cluster through the real in-memory store: its member record, its default memory
//! budget, and the refusal of a worker that loaded another checkpoint.

// In tests a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_coordinator::membership::{Member, MemberRole, Membership, Registration};
use switchyard_coordinator::store::{ClusterStore, MemoryStore, Store};
use switchyard_coordinator::CoordinatorError;
use switchyard_expert_worker::{all_experts_bytes, join_cluster, ExpertSpec, ExpertWorker, WorkerError, WorkerOptions};
use switchyard_model::tiny::{write_checkpoint, Preset, TinySpec};
use switchyard_model::ActivationPrecision;

const TTL: Duration = Duration::from_secs(2);

fn worker(dir: &Path, worker_id: &str) -> ExpertWorker {
    let options = WorkerOptions {
        worker_id: worker_id.to_string(),
        experts: ExpertSpec::none(),
        placement_epoch: 0,
        activation_precision: ActivationPrecision::F32,
        device: switchyard_model::Device::Cpu,
    };
    ExpertWorker::load(dir, options).unwrap()
}

/// Joins `worker` to cluster `test`; on success, also its record as the store lists it.
async fn join(store: &Arc<dyn Store>, worker: &ExpertWorker, port: u16) -> Result<(Registration, Member), WorkerError> {
    let endpoint = format!("http://127.0.0.1:{port}");
    let registration =
        join_cluster(store.clone(), "test", worker, endpoint, 1 << 20, "node-b".into(), "cpu".into(), TTL).await?;
    let members = Membership::new(ClusterStore::new(store.clone(), "test").unwrap()).members().await.unwrap();
    Ok((registration, members.into_iter().find(|m| m.worker_id == worker.worker_id()).unwrap()))
}

#[test]
fn the_default_budget_is_every_routed_experts_bytes() {
    let dir = common::tiny_model();
    let empty = worker(dir.path(), "ew-empty");
    let budget = all_experts_bytes(empty.checkpoint(), empty.text_config()).unwrap();
    assert_eq!(empty.checkpoint().ledger().bytes_read(), 0, "sized from the headers, nothing read");
    let full = common::worker(dir.path(), "all", 0);
    assert_eq!(budget, full.checkpoint().ledger().bytes_read(), "what loading every expert reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_as_an_expert_member_and_refuses_another_checkpoint() {
    let dir = common::tiny_model();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = worker(dir.path(), "ew-1");
    let hash = first.checkpoint().fingerprint().unwrap();
    let budget = all_experts_bytes(first.checkpoint(), first.text_config()).unwrap();
    let registration = join_cluster(
        store.clone(),
        "test",
        &first,
        "http://127.0.0.1:4001".into(),
        budget,
        "node-a".into(),
        "cpu".into(),
        TTL,
    )
    .await
    .unwrap();
    assert_eq!(registration.worker_id(), "ew-1");
    let membership = Membership::new(ClusterStore::new(store.clone(), "test").unwrap());
    assert_eq!(
        membership.members().await.unwrap(),
        vec![Member {
            worker_id: "ew-1".into(),
            role: MemberRole::Expert,
            endpoint: "http://127.0.0.1:4001".into(),
            node: "node-a".into(),
            device: "cpu".into(),
            memory_budget_bytes: budget,
            checkpoint_hash: hash.clone(),
            kv_dtype: None,
        }]
    );
    assert_eq!(membership.checkpoint_hash().await.unwrap(), Some(hash.clone()));

    // A second worker of the same checkpoint joins beside it.
    let second = worker(dir.path(), "ew-2");
    let (_second_registration, record) = join(&store, &second, 4002).await.unwrap();
    assert_eq!((record.node.as_str(), record.checkpoint_hash.as_str()), ("node-b", hash.as_str()));

    // BF16 fused experts instead of FP8: another checkpoint, refused with both hashes in the message.
    let other_dir = tempfile::tempdir().unwrap();
    write_checkpoint(other_dir.path(), &TinySpec { preset: Preset::Tiny, seed: 1, fp8: false }, &mut |_, _| {})
        .unwrap();
    let other = worker(other_dir.path(), "ew-other");
    let other_hash = other.checkpoint().fingerprint().unwrap();
    assert_ne!(other_hash, hash);
    let error = join(&store, &other, 4003).await.err().unwrap();
    assert!(matches!(error, WorkerError::Cluster(CoordinatorError::CheckpointMismatch { .. })), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&hash) && message.contains(&other_hash), "{message}");
    assert!(message.contains("ew-other"), "{message}");
    let ids: Vec<String> = membership.members().await.unwrap().into_iter().map(|m| m.worker_id).collect();
    assert_eq!(ids, ["ew-1", "ew-2"], "the refused worker left no record");

    // Deregistering removes the record at once.
    registration.deregister().await.unwrap();
    let ids: Vec<String> = membership.members().await.unwrap().into_iter().map(|m| m.worker_id).collect();
    assert_eq!(ids, ["ew-2"]);
}

#[tokio::test]
async fn an_invalid_cluster_name_is_refused() {
    let dir = common::tiny_model();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let worker = worker(dir.path(), "ew-1");
    let result =
        join_cluster(store, "a/b", &worker, "http://127.0.0.1:1".into(), 1, "n".into(), "cpu".into(), TTL).await;
    match result {
        Err(WorkerError::Cluster(CoordinatorError::InvalidName { field, .. })) => assert_eq!(field, "cluster"),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("joined a cluster named a/b"),
    }
}
