//! Attention worker of Switchyard.
//!
//! Will own the serving front (gRPC and OpenAI-compatible HTTP), the scheduler, the paged KV cache, and the
//! attention/dense/router/shared-expert half of each MoE step, with the dispatch/combine client. It must not hold
//! routed experts' weights.
//!
//! Empty until the distributed data plane lands (issue 3); the single-process forward pass lives in
//! `switchyard-model` today.
