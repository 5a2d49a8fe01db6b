//! [`EtcdStore`]: the store on a real etcd cluster (`etcd-client`).
//!
//! `etcd_client::Client::connect` does not touch the network, so [`EtcdStore::connect`] asks etcd for its status
//! until it answers, retrying with backoff and logging each failure, and gives up after a deadline with an error
//! naming the endpoints. Afterwards the client's channel reconnects by itself: while etcd is down (restarting,
//! partitioned) calls fail with the retryable [`CoordinatorError::StoreUnavailable`] and succeed again once it is
//! back. Watches re-open themselves from the next revision they have not delivered, so a watcher sees every event
//! across an etcd restart.
//!
//! Elections use etcd's election service (the campaign waits on the server); leader and resign are plain
//! key-value reads and transactions on the same keys, so either side interoperates with `etcdctl elect`.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp as EtcdTxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::Backoff;
use super::{
    BoxFuture, CasOutcome, Condition, KeyValue, LeaderKey, LeaseId, Listing, Store, TxnOp, WatchEvent, WatchStream,
};
use crate::CoordinatorError;

/// How to reach etcd and how patiently.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// How long [`EtcdStore::connect`] keeps trying before it gives up.
    pub connect_deadline: Duration,
    /// How long one request may take before it fails as unavailable (campaigns and watches are not limited).
    pub request_timeout: Duration,
    /// First retry delay, doubled after each failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl EtcdConfig {
    /// Defaults for `endpoints`: keep trying for 30 s, 5 s per request, retries from 100 ms up to 2 s apart.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_deadline: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// A [`Store`] on etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
    endpoints: String,
}

impl EtcdStore {
    /// Connects to etcd: retries with backoff until one endpoint answers or `config.connect_deadline` passes, then
    /// fails with [`CoordinatorError::StoreUnreachable`] naming the endpoints.
    pub async fn connect(config: EtcdConfig) -> Result<Self, CoordinatorError> {
        let endpoints = config.endpoints.join(",");
        if config.endpoints.is_empty() {
            return Err(CoordinatorError::StoreRequest {
                op: "connect",
                key: String::new(),
                reason: "no etcd endpoint given".into(),
            });
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(config.request_timeout.min(Duration::from_secs(2)))
            // Notices a peer that vanished without closing the connection (host down, partition).
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let start = Instant::now();
        let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt = async {
                let mut client = Client::connect(&config.endpoints, Some(options.clone())).await?;
                client.status().await?;
                Ok::<_, etcd_client::Error>(client)
            };
            let remaining = config.connect_deadline.saturating_sub(start.elapsed());
            let last_error = match tokio::time::timeout(config.request_timeout.min(remaining.max(ms(1))), attempt).await
            {
                Ok(Ok(client)) => {
                    if attempts > 1 {
                        tracing::info!(%endpoints, attempts, "connected to etcd after {:.1} s", start.elapsed().as_secs_f64());
                    } else {
                        tracing::debug!(%endpoints, "connected to etcd");
                    }
                    return Ok(Self { client, config, endpoints });
                }
                Ok(Err(e)) => describe(&e),
                Err(_) => format!("no answer within {:?}", config.request_timeout.min(remaining)),
            };
            let elapsed = start.elapsed();
            if elapsed >= config.connect_deadline {
                return Err(CoordinatorError::StoreUnreachable { endpoints, attempts, waited: elapsed, last_error });
            }
            let delay = backoff.next_delay().min(config.connect_deadline - elapsed);
            tracing::warn!(
                "etcd at {endpoints} is not reachable (attempt {attempts}: {last_error}); retrying in {} ms, giving up \
                 after {:.1} s",
                delay.as_millis(),
                config.connect_deadline.as_secs_f64()
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// The endpoints, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs one request with the request timeout; the inner result is etcd's answer.
    async fn within<T>(
        &self,
        op: &'static str,
        key: &str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<Result<T, etcd_client::Error>, CoordinatorError> {
        tokio::time::timeout(self.config.request_timeout, request).await.map_err(|_| {
            CoordinatorError::StoreUnavailable {
                op,
                key: key.to_string(),
                reason: format!("etcd at {} did not answer within {:?}", self.endpoints, self.config.request_timeout),
            }
        })
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CoordinatorError> {
        self.within(op, key, request).await?.map_err(|e| map_error(op, key, e))
    }

    /// Opens an etcd watch and waits for etcd to confirm it; returns the stream and the revision it starts after.
    async fn open_watch(
        &self,
        prefix: &str,
        from: Option<u64>,
    ) -> Result<(etcd_client::WatchStream, u64, Vec<WatchEvent>), CoordinatorError> {
        let mut options = WatchOptions::new().with_prefix();
        if let Some(from) = from {
            options = options.with_start_revision(from as i64);
        }
        let mut watch_client = self.client.watch_client();
        let mut stream = self.timed("watch", prefix, watch_client.watch(prefix, Some(options))).await?;
        let created =
            self.timed("watch", prefix, stream.message()).await?.ok_or_else(|| CoordinatorError::StoreUnavailable {
                op: "watch",
                key: prefix.to_string(),
                reason: "etcd closed the watch before confirming it".into(),
            })?;
        if created.canceled() {
            return Err(watch_canceled(prefix, from, &created));
        }
        let revision = created.header().map_or(0, |h| h.revision() as u64);
        let events = convert_events(prefix, &created)?;
        Ok((stream, revision, events))
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn watch_canceled(prefix: &str, from: Option<u64>, response: &etcd_client::WatchResponse) -> CoordinatorError {
    if response.compact_revision() > 0 {
        CoordinatorError::WatchLost {
            prefix: prefix.to_string(),
            reason: format!(
                "etcd compacted its history past revision {} (oldest kept: {})",
                from.unwrap_or(0),
                response.compact_revision()
            ),
        }
    } else {
        CoordinatorError::StoreUnavailable {
            op: "watch",
            key: prefix.to_string(),
            reason: format!("etcd canceled the watch: {}", response.cancel_reason()),
        }
    }
}

/// Sorts an etcd-client error into unavailable (retryable) or refused.
fn map_error(op: &'static str, key: &str, error: etcd_client::Error) -> CoordinatorError {
    use etcd_client::Error as E;
    use tonic::Code;
    let key = key.to_string();
    match error {
        E::GRpcStatus(ref status) => {
            let reason = describe(&error);
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Unknown
                | Code::Internal => CoordinatorError::StoreUnavailable { op, key, reason },
                _ => CoordinatorError::StoreRequest { op, key, reason },
            }
        }
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) | E::ElectError(_) => {
            CoordinatorError::StoreUnavailable { op, key, reason: describe(&error) }
        }
        other => CoordinatorError::StoreRequest { op, key, reason: describe(&other) },
    }
}

/// A one-line account of an etcd-client error: gRPC code and message, then the root cause (`Connection refused`).
fn describe(error: &etcd_client::Error) -> String {
    let mut text = match error {
        etcd_client::Error::GRpcStatus(status) => format!("{:?}: {}", status.code(), status.message()),
        other => other.to_string(),
    };
    let source = match error {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    let mut root = source;
    while let Some(next) = root.and_then(|e| e.source()) {
        root = Some(next);
    }
    if let Some(root) = root {
        let root = root.to_string();
        if !text.contains(&root) {
            text = format!("{text}: {root}");
        }
    }
    text
}

fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => status.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}

/// Maps a request that may name a lease: "lease not found" becomes [`CoordinatorError::LeaseNotFound`].
fn with_lease<T>(
    lease: Option<LeaseId>,
    op: &'static str,
    key: &str,
    result: Result<T, etcd_client::Error>,
) -> Result<T, CoordinatorError> {
    match (result, lease) {
        (Ok(v), _) => Ok(v),
        (Err(e), Some(lease)) if is_lease_not_found(&e) => Err(CoordinatorError::LeaseNotFound { lease: lease.0 }),
        (Err(e), _) => Err(map_error(op, key, e)),
    }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, CoordinatorError> {
    let key = kv.key_str().map_err(|e| CoordinatorError::CorruptRecord {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: format!("the key is not UTF-8: {e}"),
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision() as u64,
        mod_revision: kv.mod_revision() as u64,
        version: kv.version() as u64,
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

fn convert_events(prefix: &str, response: &etcd_client::WatchResponse) -> Result<Vec<WatchEvent>, CoordinatorError> {
    let mut events = Vec::with_capacity(response.events().len());
    for event in response.events() {
        let Some(kv) = event.kv() else {
            return Err(CoordinatorError::StoreRequest {
                op: "watch",
                key: prefix.to_string(),
                reason: "etcd sent an event without a key".into(),
            });
        };
        let kv = convert_kv(kv)?;
        events.push(match event.event_type() {
            EventType::Put => WatchEvent::Put(kv),
            EventType::Delete => WatchEvent::Delete { key: kv.key, revision: kv.mod_revision },
        });
    }
    Ok(events)
}

fn compare(condition: &Condition) -> Compare {
    match condition {
        Condition::ModRevision { key, expected: None } => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        Condition::ModRevision { key, expected: Some(revision) } => {
            Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision as i64)
        }
        // Over a range, etcd requires every key to match; version 0 matches only "no key at all".
        Condition::PrefixEmpty { prefix } => Compare::version(prefix.as_str(), CompareOp::Equal, 0).with_prefix(),
    }
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| h.revision() as u64)
}

impl Store for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = self.timed("get", key, kv.get(key, None)).await?;
            response.kvs().first().map(convert_kv).transpose()
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Listing, CoordinatorError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = self.timed("list", prefix, kv.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
            let kvs = response.kvs().iter().map(convert_kv).collect::<Result<_, _>>()?;
            Ok(Listing { kvs, revision: header_revision(response.header()) })
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<u64, CoordinatorError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let request = kv.put(key, value, put_options(lease));
            let response = with_lease(lease, "put", key, self.within("put", key, request).await?)?;
            Ok(header_revision(response.header()))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, CoordinatorError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let response = self.timed("delete", key, kv.delete(key, None)).await?;
            Ok(response.deleted() > 0)
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, CoordinatorError>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let options = DeleteOptions::new().with_prefix();
            let response = self.timed("delete_prefix", prefix, kv.delete(prefix, Some(options))).await?;
            Ok(response.deleted().max(0) as u64)
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<u64>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'a, Result<CasOutcome, CoordinatorError>> {
        Box::pin(async move {
            let txn = Txn::new()
                .when([compare(&Condition::ModRevision { key: key.to_string(), expected })])
                .and_then([EtcdTxnOp::put(key, value, put_options(lease))])
                .or_else([EtcdTxnOp::get(key, None)]);
            let mut kv = self.client.kv_client();
            let response =
                with_lease(lease, "compare_and_swap", key, self.within("compare_and_swap", key, kv.txn(txn)).await?)?;
            if response.succeeded() {
                return Ok(CasOutcome::Swapped { revision: header_revision(response.header()) });
            }
            let mut current = None;
            for op in response.op_responses() {
                if let TxnOpResponse::Get(get) = op {
                    current = get.kvs().first().map(convert_kv).transpose()?;
                }
            }
            Ok(CasOutcome::Conflict { current })
        })
    }

    fn txn<'a>(
        &'a self,
        conditions: Vec<Condition>,
        ops: Vec<TxnOp>,
    ) -> BoxFuture<'a, Result<Option<u64>, CoordinatorError>> {
        Box::pin(async move {
            let first_key = ops.first().map_or(String::new(), |op| match op {
                TxnOp::Put { key, .. } | TxnOp::Delete { key } => key.clone(),
            });
            let lease = ops.iter().find_map(|op| match op {
                TxnOp::Put { lease, .. } => *lease,
                TxnOp::Delete { .. } => None,
            });
            let compares: Vec<Compare> = conditions.iter().map(compare).collect();
            let etcd_ops: Vec<EtcdTxnOp> = ops
                .into_iter()
                .map(|op| match op {
                    TxnOp::Put { key, value, lease } => EtcdTxnOp::put(key, value, put_options(lease)),
                    TxnOp::Delete { key } => EtcdTxnOp::delete(key, None),
                })
                .collect();
            let mut kv = self.client.kv_client();
            let request = kv.txn(Txn::new().when(compares).and_then(etcd_ops));
            let response = with_lease(lease, "txn", &first_key, self.within("txn", &first_key, request).await?)?;
            Ok(response.succeeded().then(|| header_revision(response.header())))
        })
    }

    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, CoordinatorError>> {
        Box::pin(async move {
            let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
            let mut lease = self.client.lease_client();
            let response = self.timed("grant_lease", "", lease.grant(seconds.max(1) as i64, None)).await?;
            Ok(LeaseId(response.id()))
        })
    }

    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>> {
        Box::pin(async move {
            // One refresh per stream: a short-lived stream cannot be left broken by an etcd restart.
            let mut client = self.client.lease_client();
            let key = lease.to_string();
            with_lease(
                Some(lease),
                "keep_alive",
                &key,
                self.within("keep_alive", &key, client.keep_alive(lease.0)).await?,
            )
            .map(|_| ())
        })
    }

    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.lease_client();
            let key = lease.to_string();
            with_lease(
                Some(lease),
                "revoke_lease",
                &key,
                self.within("revoke_lease", &key, client.revoke(lease.0)).await?,
            )
            .map(|_| ())
        })
    }

    fn watch<'a>(&'a self, prefix: &'a str, from: Option<u64>) -> BoxFuture<'a, Result<WatchStream, CoordinatorError>> {
        Box::pin(async move {
            let (stream, created_at, first) = self.open_watch(prefix, from).await?;
            let next = from.unwrap_or(created_at + 1);
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(run_watch(self.clone(), prefix.to_string(), stream, next, first, tx));
            Ok(Box::pin(ReceiverStream::new(rx)) as WatchStream)
        })
    }

    fn campaign<'a>(
        &'a self,
        election: &'a str,
        lease: LeaseId,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<LeaderKey, CoordinatorError>> {
        Box::pin(async move {
            let mut client = self.client.election_client();
            // No timeout: the campaign waits on the server until this candidate leads.
            let response =
                with_lease(Some(lease), "campaign", election, client.campaign(election, value, lease.0).await)?;
            let leader = response.leader().ok_or_else(|| CoordinatorError::StoreRequest {
                op: "campaign",
                key: election.to_string(),
                reason: "etcd answered the campaign without a leader key".into(),
            })?;
            let key = leader.key_str().map_err(|e| CoordinatorError::CorruptRecord {
                key: election.to_string(),
                reason: format!("leader key is not UTF-8: {e}"),
            })?;
            Ok(LeaderKey {
                election: election.to_string(),
                key: key.to_string(),
                create_revision: leader.rev() as u64,
                lease: LeaseId(leader.lease()),
            })
        })
    }

    fn leader<'a>(&'a self, election: &'a str) -> BoxFuture<'a, Result<Option<KeyValue>, CoordinatorError>> {
        Box::pin(async move {
            // What etcd's election service does: the candidate whose key was created first leads.
            let prefix = format!("{election}/");
            let options =
                GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend).with_limit(1);
            let mut kv = self.client.kv_client();
            let response = self.timed("leader", election, kv.get(prefix, Some(options))).await?;
            response.kvs().first().map(convert_kv).transpose()
        })
    }

    fn resign<'a>(&'a self, leader: &'a LeaderKey) -> BoxFuture<'a, Result<(), CoordinatorError>> {
        Box::pin(async move {
            let txn = Txn::new()
                .when([Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.create_revision as i64)])
                .and_then([EtcdTxnOp::delete(leader.key.as_str(), None)]);
            let mut kv = self.client.kv_client();
            self.timed("resign", &leader.key, kv.txn(txn)).await?;
            Ok(())
        })
    }
}

/// Forwards etcd watch events to `tx`, re-opening the watch from the next undelivered revision whenever it breaks.
async fn run_watch(
    store: EtcdStore,
    prefix: String,
    mut stream: etcd_client::WatchStream,
    mut next: u64,
    first: Vec<WatchEvent>,
    tx: mpsc::Sender<Result<WatchEvent, CoordinatorError>>,
) {
    for event in first {
        next = event.revision() + 1;
        if tx.send(Ok(event)).await.is_err() {
            return;
        }
    }
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return,
            message = stream.message() => message,
        };
        let broken = match message {
            Ok(Some(response)) if response.canceled() => {
                let error = watch_canceled(&prefix, Some(next), &response);
                if let CoordinatorError::WatchLost { .. } = error {
                    let _ = tx.send(Err(error)).await;
                    return;
                }
                error.to_string()
            }
            Ok(Some(response)) => match convert_events(&prefix, &response) {
                Ok(events) => {
                    for event in events {
                        next = event.revision() + 1;
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            },
            Ok(None) => "etcd closed the watch stream".to_string(),
            Err(e) => describe(&e),
        };
        tracing::warn!(
            "watch on {prefix:?} at etcd {} broke ({broken}); re-opening it from revision {next}",
            store.endpoints
        );
        let started = Instant::now();
        let mut backoff = Backoff::new(store.config.initial_backoff.min(ms(50)), store.config.max_backoff);
        let mut attempts = 0u32;
        stream = loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            attempts += 1;
            match store.open_watch(&prefix, Some(next)).await {
                Ok((stream, _, events)) => {
                    tracing::info!(
                        "watch on {prefix:?} re-opened from revision {next} after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    let mut closed = false;
                    for event in events {
                        next = event.revision() + 1;
                        closed |= tx.send(Ok(event)).await.is_err();
                    }
                    if closed {
                        return;
                    }
                    break stream;
                }
                Err(e @ CoordinatorError::WatchLost { .. }) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => {
                    // Every tenth failure, to show it is still trying without flooding the log.
                    if attempts % 10 == 1 {
                        tracing::warn!("cannot re-open watch on {prefix:?} yet (attempt {attempts}): {e}");
                    }
                }
            }
        };
    }
}
