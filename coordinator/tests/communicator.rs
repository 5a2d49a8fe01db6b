//! Communicator bootstrap over real gRPC on loopback: ranks of one communicator meet through a served coordinator
//! (`switchyard.v1.Communicator`, as `service::serve` serves it), waiting ranks get rank 0's id whether they asked
//! before or after it published, wrong world sizes, second publishers and bad inputs are refused with messages naming
//! what was wrong, a missing publisher times out clearly, and the id lives in the store: a restarted coordinator still
//! hands it out, and it goes with rank 0's lease.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_coordinator::communicator::{CommunicatorClient, UNIQUE_ID_BYTES};
use switchyard_coordinator::service::{serve, CoordinatorService};
use switchyard_coordinator::store::{ClusterStore, LeaseId, MemoryStore, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

/// A coordinator serving on a loopback port until dropped (or stopped).
struct Coordinator {
    endpoint: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Coordinator {
    async fn start(store: Arc<dyn Store>) -> Coordinator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let cluster = ClusterStore::new(store, "c").unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(CoordinatorService::new(cluster), None, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Coordinator { endpoint, stop: Some(stop), task: Some(task) }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task).await.expect("the coordinator stops").unwrap();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn id(seed: u8) -> Vec<u8> {
    (0..UNIQUE_ID_BYTES).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn lease(store: &Arc<dyn Store>) -> LeaseId {
    store.grant_lease(Duration::from_secs(30)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_bootstrap_one_communicator_early_or_late() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let coordinator = Coordinator::start(store.clone()).await;
    let client = CommunicatorClient::new(&coordinator.endpoint).unwrap();
    // Ranks 1 and 2 ask before rank 0 has published.
    let early: Vec<_> = (1..3)
        .map(|rank| {
            let client = client.clone();
            tokio::spawn(async move { client.wait("moe-0", 4, rank, Duration::from_secs(5)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lease = lease(&store).await;
    assert!(!client.publish("moe-0", 4, &id(1), lease, "aw-0").await.unwrap());
    // A retried publication by the same rank 0 is not an error.
    assert!(client.publish("moe-0", 4, &id(1), lease, "aw-0").await.unwrap());
    for waiting in early {
        let published = waiting.await.unwrap().unwrap();
        assert_eq!((published.unique_id, published.world_size, published.publisher.as_str()), (id(1), 4, "aw-0"));
    }
    // Rank 3 comes late: the id is there already.
    let late = client.wait("moe-0", 4, 3, Duration::from_millis(0)).await.unwrap();
    assert_eq!(late.unique_id, id(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_world_sizes_second_publishers_and_bad_inputs_are_refused() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let coordinator = Coordinator::start(store.clone()).await;
    let client = CommunicatorClient::new(&coordinator.endpoint).unwrap();
    let first = lease(&store).await;
    client.publish("moe-1", 4, &id(1), first, "aw-0").await.unwrap();

    let wrong_size = client.wait("moe-1", 3, 1, Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(wrong_size.code(), Code::FailedPrecondition);
    let message = wrong_size.to_string();
    assert!(
        message.contains("world size 4") && message.contains("world size 3") && message.contains("moe-1"),
        "{message}"
    );

    let second = lease(&store).await;
    let again = client.publish("moe-1", 4, &id(2), second, "ew-3").await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    let message = again.to_string();
    assert!(message.contains("aw-0") && message.contains("ew-3"), "{message}");
    // The first id stands.
    assert_eq!(client.wait("moe-1", 4, 2, Duration::ZERO).await.unwrap().unique_id, id(1));

    for (call, expected) in [
        (client.publish("moe/2", 4, &id(1), first, "aw-0").await.map(|_| ()), "'/'"),
        (client.publish("moe-2", 4, &id(1)[..16], first, "aw-0").await.map(|_| ()), "16 bytes"),
        (client.publish("moe-2", 0, &id(1), first, "aw-0").await.map(|_| ()), "world_size"),
        (client.publish("moe-2", 4, &id(1), LeaseId(0), "aw-0").await.map(|_| ()), "lease"),
        (client.wait("moe-2", 4, 0, Duration::ZERO).await.map(|_| ()), "rank 0"),
        (client.wait("moe-2", 4, 4, Duration::ZERO).await.map(|_| ()), "rank 4"),
        (client.wait("", 4, 1, Duration::ZERO).await.map(|_| ()), "empty"),
    ] {
        let error = call.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
        assert!(error.to_string().contains(expected), "{error} should mention {expected}");
    }
    // A lease that is gone cannot carry a publication.
    store.revoke_lease(second).await.unwrap();
    let gone = client.publish("moe-2", 4, &id(1), second, "aw-0").await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publisher_times_out_with_a_clear_error() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let coordinator = Coordinator::start(store).await;
    let client = CommunicatorClient::new(&coordinator.endpoint).unwrap();
    let started = Instant::now();
    let error = client.wait("nobody", 2, 1, Duration::from_millis(300)).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300) && started.elapsed() < Duration::from_secs(3));
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    let message = error.to_string();
    assert!(message.contains("\"nobody\"") && message.contains("rank 0 did not publish"), "{message}");

    // No coordinator at all: a clear error too, not a hang.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = CommunicatorClient::new(&endpoint).unwrap();
    let error = unreachable.wait("nobody", 2, 1, Duration::from_millis(100)).await.unwrap_err();
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert!(CommunicatorClient::new("not a url").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_id_outlives_a_coordinator_restart_and_goes_with_rank_0s_lease() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let first = Coordinator::start(store.clone()).await;
    let lease = lease(&store).await;
    CommunicatorClient::new(&first.endpoint).unwrap().publish("moe-3", 2, &id(5), lease, "aw-0").await.unwrap();
    first.stop().await;

    let second = Coordinator::start(store.clone()).await;
    let client = CommunicatorClient::new(&second.endpoint).unwrap();
    assert_eq!(client.wait("moe-3", 2, 1, Duration::ZERO).await.unwrap().unique_id, id(5));

    // Rank 0's lease ends: the id is released, and the name can carry a new communicator.
    store.revoke_lease(lease).await.unwrap();
    let error = client.wait("moe-3", 2, 1, Duration::from_millis(100)).await.unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error}");
    let next = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    assert!(!client.publish("moe-3", 2, &id(6), next, "aw-1").await.unwrap());
    assert_eq!(client.wait("moe-3", 2, 1, Duration::ZERO).await.unwrap().unique_id, id(6));
}
