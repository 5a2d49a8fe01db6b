//! Temporary probe (not committed): times codec pieces and gRPC dispatches.
#![allow(missing_docs, clippy::unwrap_used)]
use std::sync::Arc;
use std::time::Instant;
use switchyard_transport::bench::EchoExpertService;
use switchyard_transport::codec;
use switchyard_transport::grpc::{server_builder, DispatchServer, GrpcTransport};
use switchyard_transport::{ExpertBatch, ExpertService, Transport, WireDtype, WireFormat};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn batch(tokens: usize, hidden: usize) -> ExpertBatch {
    ExpertBatch {
        step_id: 0, micro_batch: 0, layer: 0, placement_epoch: 0, attention_worker: "bench".into(),
        experts: vec![0; tokens],
        inputs: (0..tokens * hidden).map(|i| ((i % 251) as f32 - 125.0) / 64.0).collect(),
        hidden,
    }
}

fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

fn minflt() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[7].parse().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args[1].as_str() {
        "serve" => rt().block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            println!("{}", l.local_addr().unwrap());
            let service: Arc<dyn ExpertService> = Arc::new(EchoExpertService);
            server_builder()
                .add_service(DispatchServer::new(service, "p".into()).into_service())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await
                .unwrap();
        }),
        "codec" => {
            let tokens: usize = args[2].parse().unwrap();
            let b = batch(tokens, 5120);
            for _ in 0..3 {
                let t = Instant::now();
                let c = b.clone();
                let clone = t.elapsed();
                let t = Instant::now();
                let a = codec::encode(&c.inputs, tokens, 5120, WireDtype::Fp8E4m3);
                let e8 = t.elapsed();
                let t = Instant::now();
                let d = codec::decode(&a).unwrap();
                let d8 = t.elapsed();
                let mut reuse = d.clone();
                let a8 = codec::encode(&c.inputs, tokens, 5120, WireDtype::Fp8E4m3);
                let t = Instant::now();
                codec::decode_into(&a8, &mut reuse).unwrap();
                let d8i = t.elapsed();
                let t = Instant::now();
                let a = codec::encode(&d, tokens, 5120, WireDtype::Bf16);
                let e16 = t.elapsed();
                let t = Instant::now();
                let d = codec::decode(&a).unwrap();
                let d16 = t.elapsed();
                let t = Instant::now();
                codec::decode_into(&a, &mut reuse).unwrap();
                let d16i = t.elapsed();
                let t = Instant::now();
                reuse.copy_from_slice(&d);
                let copy = t.elapsed();
                let t = Instant::now();
                let r = codec::request_from_batch(1, &c, WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 });
                let req = t.elapsed();
                drop(r);
                println!("copy {copy:?} dec8into {d8i:?} dec16into {d16i:?} clone {clone:?} enc8 {e8:?} dec8 {d8:?} enc16 {e16:?} dec16 {d16:?} req {req:?} {}", d.len());
            }
        }
        "client" => rt().block_on(async {
            let url = args[2].clone();
            let dtype: WireDtype = args[3].parse().unwrap();
            let tokens: usize = args[4].parse().unwrap();
            let n: usize = args[5].parse().unwrap();
            let t = GrpcTransport::new(WireFormat { dispatch: dtype, combine: WireDtype::Bf16 }, "b".into());
            t.add_worker("peer", url);
            let b = batch(tokens, 5120);
            let mut times = Vec::new();
            let outside = std::env::var("CLONE_OUTSIDE").is_ok();
            let pre = std::env::var("PRECLONE").is_ok();
            let mut clones: Vec<ExpertBatch> = if pre { (0..n).map(|_| b.clone()).collect() } else { Vec::new() };
            if pre {
                eprintln!("READY");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            let cpu0 = cpu();
            let flt0 = minflt();
            let w0 = Instant::now();
            for _ in 0..n {
                let c = if outside { Some(b.clone()) } else { clones.pop() };
                let s = Instant::now();
                let c = c.unwrap_or_else(|| b.clone());
                t.dispatch("peer", c).await.unwrap();
                times.push(s.elapsed().as_secs_f64() * 1e6);
            }
            eprintln!("client cpu per dispatch {:.1} ms (wall {:.1} ms) faults {}", (cpu() - cpu0) / n as f64 * 1e3, w0.elapsed().as_secs_f64() / n as f64 * 1e3, (minflt() - flt0) / n as u64);
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            println!("{dtype} {tokens}: p50 {:.0}us mean {:.0}us min {:.0}us", sorted[n / 2], times.iter().sum::<f64>() / n as f64, sorted[0]);
        }),
        _ => panic!(),
    }
}
