//! Wire formats of Switchyard.
//!
//! Owns every `.proto` file and the generated gRPC code (dispatch/combine, worker control, client API). Nothing else
//! in the workspace defines a wire format. It must not depend on model math or on any worker.
//!
//! Empty until the distributed data plane lands (issue 3): no service is defined yet, and nothing here claims to be.
