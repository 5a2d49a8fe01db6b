//! Context-parallel groups: which attention workers hold which range of a sequence too long for one of them.
//!
//! Only a sequence's global-layer KV grows with its length, so that is what is spread: the owner keeps the first
//! range (as much as it has room for) and the other attention workers take the next ranges, the roomiest first, so a
//! group has as few members as possible (each member costs a round trip per global layer and step). Ranges start on
//! KV block boundaries. Groups are recorded in the store under the owner's lease, so they vanish with a dead owner
//! and every owner sees what the others took from each worker's room.
//!
//! The assignment is a pure function of the members' room, so it runs where the sequence is admitted, in the owner,
//! against the store: a round trip to a coordinator process at every long admission would buy nothing but latency,
//! and the store is where the coordinator's decisions live anyway.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;
use crate::store::cluster::ClusterStore;
use crate::store::LeaseId;

/// Room an attention worker has for global-layer positions of context-parallel sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextRoom {
    /// The attention worker.
    pub worker_id: String,
    /// Where its `ContextShard` service is (its gRPC endpoint).
    pub endpoint: String,
    /// Global-layer positions it can still hold.
    pub tokens: usize,
}

/// One member's range of a sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextRange {
    /// The attention worker holding it.
    pub worker_id: String,
    /// Its endpoint.
    pub endpoint: String,
    /// First position held.
    pub start: usize,
    /// One past the last position held.
    pub end: usize,
}

impl ContextRange {
    /// Positions in the range.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the range holds nothing.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// A context-parallel group, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextGroup {
    /// The sequence, unique in the cluster.
    pub sequence_id: String,
    /// The owner's worker id (it holds `ranges[0]`).
    pub owner: String,
    /// Positions the sequence may reach (prompt plus tokens to generate).
    pub tokens: usize,
    /// The owner's range first, then the members' in position order; contiguous from 0 to `tokens`.
    pub ranges: Vec<ContextRange>,
}

/// Spreads a sequence of `tokens` positions over `owner` and the attention workers in `others`, in ranges starting on
/// multiples of `block_size`. Fails, giving both numbers, when all of their room together is too small.
pub fn assign_group(
    sequence_id: &str,
    owner: &ContextRoom,
    others: &[ContextRoom],
    tokens: usize,
    block_size: usize,
) -> Result<ContextGroup, CoordinatorError> {
    let block_size = block_size.max(1);
    // Room in whole blocks: a range must start on a block boundary, so a partial block cannot be handed out.
    let whole = |room: usize| room / block_size * block_size;
    let mut candidates: Vec<&ContextRoom> = others.iter().filter(|r| r.worker_id != owner.worker_id).collect();
    candidates.sort_by(|a, b| b.tokens.cmp(&a.tokens).then_with(|| a.worker_id.cmp(&b.worker_id)));
    let cluster_tokens = whole(owner.tokens) + candidates.iter().map(|r| whole(r.tokens)).sum::<usize>();
    if cluster_tokens < tokens {
        return Err(CoordinatorError::ContextTooLong { tokens, cluster_tokens, workers: candidates.len() + 1 });
    }
    let mut ranges = Vec::new();
    let mut start = 0;
    for room in std::iter::once(owner).chain(candidates) {
        if start >= tokens {
            break;
        }
        let take = whole(room.tokens).min(tokens - start);
        if take == 0 && room.worker_id != owner.worker_id {
            continue;
        }
        ranges.push(ContextRange {
            worker_id: room.worker_id.clone(),
            endpoint: room.endpoint.clone(),
            start,
            end: start + take,
        });
        start += take;
    }
    Ok(ContextGroup { sequence_id: sequence_id.to_string(), owner: owner.worker_id.clone(), tokens, ranges })
}

impl ContextGroup {
    /// Positions each worker holds in this group, by worker id.
    pub fn tokens_by_worker(&self) -> BTreeMap<String, usize> {
        let mut by_worker = BTreeMap::new();
        for range in &self.ranges {
            *by_worker.entry(range.worker_id.clone()).or_default() += range.len();
        }
        by_worker
    }
}

impl ClusterStore {
    /// Where context-parallel groups are recorded.
    pub fn context_groups_prefix(&self) -> String {
        format!("{}context/", self.root())
    }

    /// Records `group` under the owner's `lease` (it disappears with the owner).
    pub async fn record_context_group(&self, group: &ContextGroup, lease: LeaseId) -> Result<(), CoordinatorError> {
        let key = format!("{}{}", self.context_groups_prefix(), group.sequence_id);
        let value = serde_json::to_vec(group).map_err(|e| CoordinatorError::StoreRequest {
            op: "put",
            key: key.clone(),
            reason: e.to_string(),
        })?;
        self.store().put(&key, value, Some(lease)).await.map(|_| ())
    }

    /// Every recorded group.
    pub async fn context_groups(&self) -> Result<Vec<ContextGroup>, CoordinatorError> {
        let listing = self.store().list(&self.context_groups_prefix()).await?;
        listing
            .kvs
            .iter()
            .map(|kv| {
                serde_json::from_slice(&kv.value)
                    .map_err(|e| CoordinatorError::CorruptRecord { key: kv.key.clone(), reason: e.to_string() })
            })
            .collect()
    }

    /// Forgets the group of `sequence_id`.
    pub async fn remove_context_group(&self, sequence_id: &str) -> Result<(), CoordinatorError> {
        self.store().delete(&format!("{}{sequence_id}", self.context_groups_prefix())).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: &str, tokens: usize) -> ContextRoom {
        ContextRoom { worker_id: id.into(), endpoint: format!("http://{id}"), tokens }
    }

    #[test]
    fn the_owner_first_then_the_roomiest_on_block_boundaries() {
        let group =
            assign_group("s", &room("aw-0", 1000), &[room("aw-1", 600), room("aw-2", 1500)], 3000, 16).expect("fits");
        let spans: Vec<(&str, usize, usize)> =
            group.ranges.iter().map(|r| (r.worker_id.as_str(), r.start, r.end)).collect();
        assert_eq!(spans, [("aw-0", 0, 992), ("aw-2", 992, 2480), ("aw-1", 2480, 3000)]);
        assert!(group.ranges.iter().all(|r| r.start % 16 == 0));
    }

    #[test]
    fn too_little_room_names_both_numbers() {
        let error = assign_group("s", &room("aw-0", 100), &[room("aw-1", 100)], 1000, 16).expect_err("too long");
        let message = error.to_string();
        assert!(message.contains("1000 positions") && message.contains("192"), "{message}");
    }

    #[test]
    fn a_short_enough_sequence_stays_with_its_owner() {
        let group = assign_group("s", &room("aw-0", 4096), &[room("aw-1", 4096)], 100, 16).expect("fits");
        assert_eq!(group.ranges.len(), 1);
        assert_eq!(group.tokens_by_worker()["aw-0"], 100);
    }
}
