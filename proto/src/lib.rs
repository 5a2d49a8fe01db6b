//! Wire formats of Switchyard.
//!
//! Owns every `.proto` file (`proto/switchyard/v1/`) and the code generated from them: dispatch/combine between
//! attention and expert workers, expert-worker control, the coordinator's placement API, the cluster store a coordinator serves
//! (`switchyard.v1.Store`), the client Generate API, context-parallel attention between attention workers
//! (`switchyard.v1.ContextShard`), and the bootstrap of collective communicators through the coordinator
//! (`switchyard.v1.Communicator`).
//! Nothing else in the workspace defines a wire format. It must not depend on model math or on any worker.
//!
//! Byte fields are generated as `bytes::Bytes`, so activation payloads are not copied by decoding.

/// Version 1 of the Switchyard protocol (`package switchyard.v1`).
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("switchyard.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("switchyard_descriptor");
}
