//! Cluster coordination for Switchyard.
//!
//! Will own membership (etcd or an in-memory store), expert placement and replication, live rebalancing, failure
//! handling and 1M-token context-shard planning. It must not depend on model math (`switchyard-model`'s layers) nor
//! on kernels.
//!
//! Empty until the coordinator issue lands: there is no placement or membership code here yet.
