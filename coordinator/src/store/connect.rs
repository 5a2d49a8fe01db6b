//! [`connect`]: the one entry point from a store URL (`--store`) to a [`Store`].
//!
//! - `etcd://host:port[,host:port...]`: an etcd cluster ([`EtcdStore`], over `http://` endpoints).
//! - `http://host:port`: the store a coordinator hosts in memory and serves over gRPC ([`RemoteStore`]).
//!
//! Either way it returns once the store has answered, retrying with backoff (and logging each retry with the URL)
//! while it is not reachable yet, for instance while `switchyard up` is still starting the coordinator.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Backoff, EtcdConfig, EtcdStore, RemoteStore, Store};
use crate::CoordinatorError;

/// How long [`connect`] waits for the store to answer.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// A key nobody writes: reading it proves the store serves requests.
const PROBE_KEY: &str = "/switchyard-connect-probe";

/// Connects to the store at `url`, waiting up to [`CONNECT_PATIENCE`] for it to answer.
///
/// An unknown form fails at once with [`CoordinatorError::InvalidName`] naming the URL and the accepted forms; a
/// store that does not answer in time fails with [`CoordinatorError::StoreUnreachable`] (etcd) or
/// [`CoordinatorError::StoreUnavailable`] (a coordinator), naming the URL and the last error.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, CoordinatorError> {
    connect_within(url, CONNECT_PATIENCE).await
}

/// [`connect`], waiting up to `patience` for the store to answer.
pub async fn connect_within(url: &str, patience: Duration) -> Result<Arc<dyn Store>, CoordinatorError> {
    let invalid = |reason| CoordinatorError::InvalidName { field: "store URL", value: url.to_string(), reason };
    if let Some(hosts) = url.strip_prefix("etcd://") {
        let endpoints = hosts.split(',').map(etcd_endpoint).collect::<Option<Vec<_>>>().ok_or_else(|| {
            invalid("etcd:// takes comma-separated host:port endpoints, e.g. etcd://10.0.0.1:2379,10.0.0.2:2379")
        })?;
        let mut config = EtcdConfig::new(endpoints);
        config.connect_deadline = patience;
        return Ok(Arc::new(EtcdStore::connect(config).await?));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        let store = RemoteStore::new(url)?;
        wait_until_answering(&store, url, patience).await?;
        return Ok(Arc::new(store));
    }
    Err(invalid(
        "the accepted forms are etcd://host:port[,host:port...] (an etcd cluster) and http://host:port (the store a \
         switchyard coordinator serves)",
    ))
}

/// `http://host:port` for one `host:port` of an `etcd://` URL; `None` if it is not of that form.
fn etcd_endpoint(host_port: &str) -> Option<String> {
    let (host, port) = host_port.rsplit_once(':')?;
    let plain_host = !host.is_empty() && !host.contains(['/', '@', '?', '#']);
    (plain_host && port.parse::<u16>().is_ok()).then(|| format!("http://{host_port}"))
}

/// Reads a key until the store answers, retrying with backoff while it is unreachable, for up to `patience`.
async fn wait_until_answering(store: &RemoteStore, url: &str, patience: Duration) -> Result<(), CoordinatorError> {
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = patience.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
        let last_error = match tokio::time::timeout(remaining, store.get(PROBE_KEY)).await {
            Ok(Ok(_)) => {
                if attempts > 1 {
                    tracing::info!(url, attempts, "store answered after {:.1} s", start.elapsed().as_secs_f64());
                }
                return Ok(());
            }
            Ok(Err(e)) if e.retryable() => e.to_string(),
            Ok(Err(e)) => return Err(e),
            Err(_) => format!("no answer within {remaining:?}"),
        };
        let elapsed = start.elapsed();
        if elapsed >= patience {
            return Err(CoordinatorError::StoreUnavailable {
                op: "connect",
                key: url.to_string(),
                reason: format!(
                    "gave up after {attempts} attempts over {:.1} s (last error: {last_error}); is a switchyard \
                     coordinator serving its store there?",
                    elapsed.as_secs_f64()
                ),
            });
        }
        let delay = backoff.next_delay().min(patience - elapsed);
        tracing::warn!(
            url,
            "store at {url} is not reachable (attempt {attempts}: {last_error}); retrying in {} ms, giving up after \
             {:.1} s",
            delay.as_millis(),
            patience.as_secs_f64()
        );
        tokio::time::sleep(delay).await;
    }
}
