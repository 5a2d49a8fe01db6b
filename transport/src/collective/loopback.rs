//! [`LoopbackCollective`]: the ranks of a communicator as threads of one process, joined by channels.
//!
//! It stands in for NCCL where several GPUs are not at hand: the bytes, the two phases, the sequence numbers and the
//! failure handling above it are the real ones; only the point-to-point moves are channel sends. A rank that goes away
//! (its thread ends, it drops its collective) closes its channels, so peers waiting on it fail at once naming it; a
//! rank that fails sends its peers the reason before leaving.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::{AbortFlag, CollectiveError, Lockstep, PointToPoint, POLL};

/// What travels between two ranks.
enum Packet {
    /// One send of a group.
    Data(Vec<u8>),
    /// The sender failed, blaming a rank or not, for this reason; nothing more comes.
    Abort { blamed: Option<usize>, reason: String },
}

/// One rank's ends of the channels: a sender to every rank and a receiver from every rank (itself included).
struct Channels {
    rank: usize,
    to: Vec<Sender<Packet>>,
    from: Vec<Receiver<Packet>>,
}

impl Channels {
    /// The error for `peer`, whose channel to it is closed: its abort, if it sent one before leaving.
    fn gone(&self, peer: usize) -> CollectiveError {
        if let Some(channel) = self.from.get(peer) {
            while let Ok(packet) = channel.try_recv() {
                if let Packet::Abort { blamed, reason } = packet {
                    return CollectiveError::PeerAborted { rank: peer, blamed, reason };
                }
            }
        }
        CollectiveError::PeerLost { rank: peer, reason: "it left the communicator".into() }
    }
}

impl PointToPoint for Channels {
    fn grouped(
        &mut self,
        sends: &[(usize, &[u8])],
        receives: &[(usize, usize)],
        deadline: Option<Instant>,
        abort: &AbortFlag,
    ) -> Result<Vec<Vec<u8>>, CollectiveError> {
        for &(peer, bytes) in sends {
            let sent = self.to.get(peer).map(|channel| channel.send(Packet::Data(bytes.to_vec())));
            if !matches!(sent, Some(Ok(()))) {
                return Err(self.gone(peer));
            }
        }
        let mut received = Vec::with_capacity(receives.len());
        for (index, &(peer, _)) in receives.iter().enumerate() {
            let Some(channel) = self.from.get(peer) else {
                return Err(self.gone(peer));
            };
            loop {
                abort.check()?;
                let wait = match deadline {
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            let waiting_for = receives[index..].iter().map(|&(p, _)| p).collect();
                            return Err(CollectiveError::Timeout { exchange: 0, waiting_for, after: Duration::ZERO });
                        }
                        left.min(POLL)
                    }
                    None => POLL,
                };
                match channel.recv_timeout(wait) {
                    Ok(Packet::Data(bytes)) => {
                        received.push(bytes);
                        break;
                    }
                    Ok(Packet::Abort { blamed, reason }) => {
                        return Err(CollectiveError::PeerAborted { rank: peer, blamed, reason })
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(CollectiveError::PeerLost {
                            rank: peer,
                            reason: "its channel closed (the rank's thread ended or it dropped the communicator)"
                                .into(),
                        })
                    }
                }
            }
        }
        Ok(received)
    }

    fn fail(&mut self, error: &CollectiveError) {
        let reason = error.to_string();
        for (peer, channel) in self.to.iter().enumerate() {
            if peer != self.rank {
                // A peer that is gone needs no telling.
                let _ = channel.send(Packet::Abort { blamed: error.rank(), reason: reason.clone() });
            }
        }
        // Closing the channels: a peer that missed the abort fails on the closed channel instead of waiting.
        self.to.clear();
        self.from.clear();
    }
}

/// One rank of an in-process communicator (see the module docs). Make all ranks with [`LoopbackCollective::group`]
/// and hand one to each thread.
pub struct LoopbackCollective {
    lockstep: Lockstep<Channels>,
}

impl LoopbackCollective {
    /// The `world_size` ranks of a new communicator, rank `i` at index `i`.
    pub fn group(world_size: usize) -> Vec<LoopbackCollective> {
        // senders[src][dst] and receivers[dst][src]: one channel per ordered pair.
        let mut senders: Vec<Vec<Sender<Packet>>> = (0..world_size).map(|_| Vec::with_capacity(world_size)).collect();
        let mut receivers: Vec<Vec<Receiver<Packet>>> =
            (0..world_size).map(|_| Vec::with_capacity(world_size)).collect();
        for to_senders in senders.iter_mut() {
            for from in receivers.iter_mut() {
                let (sender, receiver) = mpsc::channel();
                to_senders.push(sender);
                from.push(receiver);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| LoopbackCollective {
                lockstep: Lockstep::new(Channels { rank, to, from }, rank, world_size),
            })
            .collect()
    }
}

super::forward_collective!(LoopbackCollective);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::collective::Collective;

    fn run<T: Send + 'static>(
        ranks: Vec<LoopbackCollective>,
        body: impl Fn(LoopbackCollective) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let body = Arc::new(body);
        let threads: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let body = body.clone();
                std::thread::spawn(move || body(rank))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn every_rank_gets_what_each_peer_sent_it() {
        let results = run(LoopbackCollective::group(3), |c| {
            let mut all = Vec::new();
            for round in 0..3u8 {
                // Rank r sends (r, peer, round) to each peer, nothing to rank (r + 1) % 3 in round 1.
                let sends = (0..3)
                    .map(|peer| {
                        if round == 1 && peer == (c.rank() + 1) % 3 {
                            Bytes::new()
                        } else {
                            Bytes::from(vec![c.rank() as u8, peer as u8, round])
                        }
                    })
                    .collect();
                all.push(c.exchange(sends, Some(Duration::from_secs(5))).unwrap());
            }
            (c.rank(), all)
        });
        for (rank, rounds) in results {
            for (round, received) in rounds.iter().enumerate() {
                for (peer, bytes) in received.iter().enumerate() {
                    if round == 1 && rank == (peer + 1) % 3 {
                        assert!(bytes.is_empty());
                    } else {
                        assert_eq!(&bytes[..], &[peer as u8, rank as u8, round as u8]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_naming_it() {
        let results = run(LoopbackCollective::group(3), |c| {
            if c.rank() == 2 {
                return None;
            }
            Some(c.exchange(vec![Bytes::from_static(b"x"); 3], None).unwrap_err())
        });
        for error in results.into_iter().flatten() {
            assert_eq!(error.rank(), Some(2), "{error}");
        }
    }

    #[test]
    fn a_silent_rank_times_out_and_every_rank_names_it() {
        let mut ranks = LoopbackCollective::group(3);
        let silent = ranks.pop().unwrap();
        let results = run(ranks, |c| c.exchange(vec![Bytes::new(); 3], Some(Duration::from_millis(300))).unwrap_err());
        for error in &results {
            assert!(error.to_string().contains("[2]"), "{error}");
        }
        // The silent rank, once it calls, hears that its peers gave up.
        let late = silent.exchange(vec![Bytes::new(); 3], Some(Duration::from_secs(1))).unwrap_err();
        assert!(matches!(late, CollectiveError::PeerAborted { blamed: Some(2), .. }), "{late}");
    }

    #[test]
    fn out_of_step_ranks_and_wrong_calls_are_refused() {
        let ranks = LoopbackCollective::group(2);
        let wrong = ranks[0].exchange(vec![Bytes::new()], None).unwrap_err();
        assert!(matches!(wrong, CollectiveError::InvalidArgument { .. }), "{wrong}");
        // As if rank 1 had been restarted into a communicator already 5 exchanges on.
        ranks[0].lockstep.lock().exchanges = 5;
        let results = run(ranks, |c| c.exchange(vec![Bytes::new(); 2], Some(Duration::from_secs(2))).unwrap_err());
        assert_eq!(results[0], CollectiveError::OutOfStep { rank: 1, theirs: 0, ours: 5 });
        assert_eq!(results[1], CollectiveError::OutOfStep { rank: 0, theirs: 5, ours: 0 });
    }

    #[test]
    fn abort_fails_the_waiting_exchange() {
        let mut ranks = LoopbackCollective::group(2);
        let _peer = ranks.pop().unwrap();
        let rank = Arc::new(ranks.pop().unwrap());
        let waiting = {
            let rank = rank.clone();
            std::thread::spawn(move || rank.exchange(vec![Bytes::new(); 2], None))
        };
        rank.abort("shutting down");
        let error = waiting.join().unwrap().unwrap_err();
        assert!(error.to_string().contains("shutting down"), "{error}");
        let again = rank.exchange(vec![Bytes::new(); 2], None).unwrap_err();
        assert!(matches!(again, CollectiveError::Failed { .. }), "{again}");
    }
}
