//! Pieces for `switchyard bench transport`: a raw TCP echo to measure the transport against, and an expert service
//! that returns its inputs so the benchmark measures the transport alone.
//!
//! Frames are a little-endian `u64` length followed by that many bytes; the echo server sends each frame back whole.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{BoxFuture, ExpertBatch, ExpertService, TransportError};

/// The largest frame the echo server accepts (a 4096 x 5120 f32 block is 80 MiB).
const MAX_FRAME: u64 = 1 << 30;

/// Accepts connections forever, echoing every length-prefixed frame on each; returns when accepting fails.
pub async fn raw_tcp_echo_server(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            // Nagle would hold the length prefix back from the payload.
            let _ = stream.set_nodelay(true);
            let mut buffer = Vec::new();
            loop {
                let mut prefix = [0u8; 8];
                if stream.read_exact(&mut prefix).await.is_err() {
                    return;
                }
                let length = u64::from_le_bytes(prefix);
                if length > MAX_FRAME {
                    return;
                }
                buffer.resize(length as usize, 0);
                if stream.read_exact(&mut buffer).await.is_err()
                    || stream.write_all(&prefix).await.is_err()
                    || stream.write_all(&buffer).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Sends `payload` as one frame and reads its echo back; fails if the echo differs in length.
pub async fn raw_tcp_round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    stream.write_all(&(payload.len() as u64).to_le_bytes()).await?;
    stream.write_all(payload).await?;
    let mut prefix = [0u8; 8];
    stream.read_exact(&mut prefix).await?;
    let length = u64::from_le_bytes(prefix);
    if length != payload.len() as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo of {} bytes came back as {length}", payload.len()),
        ));
    }
    let mut echo = vec![0u8; payload.len()];
    stream.read_exact(&mut echo).await?;
    Ok(())
}

/// An expert service whose every expert is the identity: the outputs are the inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoExpertService;

impl ExpertService for EchoExpertService {
    fn validate(&self, _batch: &ExpertBatch) -> Result<(), TransportError> {
        Ok(())
    }

    fn compute(&self, batch: ExpertBatch) -> BoxFuture<'static, Result<Vec<f32>, TransportError>> {
        Box::pin(async move { Ok(batch.inputs) })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trips() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(raw_tcp_echo_server(listener));
            let mut stream = TcpStream::connect(address).await.unwrap();
            for size in [0usize, 1, 100_000] {
                raw_tcp_round_trip(&mut stream, &vec![7u8; size]).await.unwrap();
            }
            server.abort();
        });
    }
}
