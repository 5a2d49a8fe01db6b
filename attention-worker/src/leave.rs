//! The agreement of lockstep attention ranks on their last tick, carried by the dispatch exchanges themselves.
//!
//! A drained engine asks its [`LockstepLeave`] at every tick boundary. [`CollectiveLeave`] marks its rank as draining
//! on the [`CollectiveTransport`] at the first ask: from its next step on, every dispatch exchange tells every
//! attention rank so, and every attention rank reads the same marks in the same exchange. The first step in which all
//! of them are marked ([`CollectiveTransport::drained_at`]) is therefore the same step everywhere; the tick that holds
//! it is the last one, and each rank leaves at the boundary that ends it, in the same exchange as every other.

use std::sync::{Arc, Mutex};

use switchyard_transport::collective::CollectiveTransport;
use switchyard_transport::TransportError;

use crate::engine::LockstepLeave;

/// A [`LockstepLeave`] that agrees through the exchanges of a [`CollectiveTransport`] (see the module docs): what a
/// deployment of several attention ranks gives [`crate::Engine::drain`]. One per attention rank, for its engine.
pub struct CollectiveLeave {
    transport: Arc<CollectiveTransport>,
    runtime: tokio::runtime::Handle,
    /// At the first ask: the engine's ticks and the index of the first step this rank marked as draining.
    began: Mutex<Option<(u64, u64)>>,
}

impl CollectiveLeave {
    /// The leave of the attention rank `transport`, whose exchanges run on `runtime` (the engine's thread blocks on
    /// them: it is not one of the runtime's threads).
    pub fn new(transport: Arc<CollectiveTransport>, runtime: tokio::runtime::Handle) -> Self {
        CollectiveLeave { transport, runtime, began: Mutex::new(None) }
    }
}

impl LockstepLeave for CollectiveLeave {
    fn last_tick(&self, ticks: u64, steps_per_tick: u64) -> Result<Option<u64>, TransportError> {
        if steps_per_tick == 0 {
            return Err(TransportError::Unavailable {
                peer: "communicator".into(),
                reason: "a tick of this engine makes no MoE layer step (a model without MoE layers): there is no \
                         exchange to agree on the last tick in"
                    .into(),
            });
        }
        // A few integers, assigned whole: a panic elsewhere cannot leave them half written.
        let mut began = self.began.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (first_tick, first_step) =
            *began.get_or_insert_with(|| (ticks, self.transport.set_draining(steps_per_tick)));
        if let Some(drained_at) = self.transport.drained_at() {
            // This rank's ticks from `first_tick` on are its steps from `first_step` on, `steps_per_tick` at a time
            // (it asks at a tick boundary, with no step in flight): the agreeing step lies in the tick
            // `first_tick + (drained_at - first_step) / steps_per_tick`, which every rank ends at the same exchange.
            let last = first_tick + drained_at.saturating_sub(first_step) / steps_per_tick + 1;
            return Ok(Some(last));
        }
        match self.transport.failure() {
            Some(failure) => Err(failure),
            None => Ok(None),
        }
    }

    fn leave(&self) -> Result<(), TransportError> {
        self.runtime.block_on(self.transport.leave())
    }
}
