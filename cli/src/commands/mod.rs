//! One module per subcommand.

pub mod attention_worker;
pub mod bench;
pub mod bench_context;
pub mod bench_e2e;
pub mod bench_gpu;
pub mod bench_placement;
pub mod bench_serve;
pub mod bench_transport;
pub mod coordinator;
pub mod expert_worker;
pub mod generate;
pub mod make_tiny;
pub mod placement;
pub mod plan;
pub mod remote_generate;
pub mod simulate;
pub mod up;
