//! Expert worker of Switchyard.
//!
//! Will own a subset of the routed experts of every MoE layer and run the grouped expert FFN for the tokens that all
//! attention workers dispatch to it. It must not know about attention, KV caches or requests.
//!
//! Empty until the distributed data plane lands (issue 3).
