//! The in-process transport: expert services called directly, without serialisation.
//!
//! Activations still pass through [`codec::round_trip`] for the configured [`WireFormat`], so a deployment that runs
//! everything in one process computes on exactly the numbers the gRPC transport would deliver.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::{codec, BoxFuture, ExpertBatch, ExpertService, Transport, TransportError, WireFormat};

/// Dispatches to [`ExpertService`]s living in this process, keyed by worker id.
pub struct InProcessTransport {
    wire: WireFormat,
    workers: RwLock<HashMap<String, Arc<dyn ExpertService>>>,
}

impl InProcessTransport {
    /// A transport with no workers yet, encoding as `wire` says.
    pub fn new(wire: WireFormat) -> Self {
        InProcessTransport { wire, workers: RwLock::new(HashMap::new()) }
    }

    /// Registers (or replaces) the expert worker `id`.
    pub fn add_worker(&self, id: impl Into<String>, service: Arc<dyn ExpertService>) -> &Self {
        self.workers.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(id.into(), service);
        self
    }

    /// Forgets the expert worker `id` (later dispatches to it fail with `Unavailable`); whether it was registered.
    pub fn remove_worker(&self, id: &str) -> bool {
        self.workers.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id).is_some()
    }

    /// The wire format the numbers are rounded to.
    pub fn wire(&self) -> WireFormat {
        self.wire
    }
}

impl Transport for InProcessTransport {
    fn dispatch(&self, worker: &str, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        let service = self.workers.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(worker).cloned();
        let wire = self.wire;
        let peer = worker.to_owned();
        Box::pin(async move {
            let service = service.ok_or_else(|| TransportError::Unavailable {
                peer: peer.clone(),
                reason: "no such expert worker in this process".into(),
            })?;
            batch.check_shape()?;
            let (tokens, hidden) = (batch.tokens(), batch.hidden);
            let inputs = codec::round_trip(&batch.inputs, hidden, wire.dispatch);
            let batch = ExpertBatch { inputs, ..batch };
            service.validate(&batch)?;
            let outputs = service.compute(batch).await?;
            if outputs.len() != tokens * hidden {
                return Err(TransportError::Compute {
                    reason: format!("expert worker {peer} returned {} values for [{tokens}, {hidden}]", outputs.len()),
                });
            }
            Ok(codec::round_trip(&outputs, hidden, wire.combine))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::EchoExpertService;
    use crate::WireDtype;

    #[test]
    fn rounds_like_the_wire_and_refuses_unknown_workers() {
        let wire = WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 };
        let transport = InProcessTransport::new(wire);
        transport.add_worker("e0", Arc::new(EchoExpertService));
        let inputs: Vec<f32> = (0..48).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let batch = ExpertBatch {
            step_id: 1,
            micro_batch: 0,
            layer: 1,
            placement_epoch: 0,
            attention_worker: "a".into(),
            experts: vec![0, 1, 2],
            inputs: inputs.clone(),
            hidden: 16,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let outputs = runtime.block_on(transport.dispatch("e0", batch.clone())).unwrap();
        let expected = codec::round_trip(&codec::round_trip(&inputs, 16, WireDtype::Fp8E4m3), 16, WireDtype::Bf16);
        assert_eq!(outputs, expected);
        let missing = runtime.block_on(transport.dispatch("e9", batch.clone())).unwrap_err();
        assert!(matches!(missing, TransportError::Unavailable { ref peer, .. } if peer == "e9"));
        let bad = ExpertBatch { hidden: 15, ..batch };
        assert!(matches!(runtime.block_on(transport.dispatch("e0", bad)), Err(TransportError::InvalidPayload { .. })));
        assert!(transport.remove_worker("e0"));
    }
}
