//! `switchyard up`: a whole cluster on this machine, each role in its own process on loopback.
//!
//! Starts the coordinator (which hosts the cluster store in memory, unless `--store` names an etcd cluster), then the
//! expert workers, which register in the store and are told by the coordinator which experts to load, waits for the
//! coordinator's first placement epoch, then starts the attention workers, which follow the placement through the
//! store. Once every process reports SERVING on gRPC health it prints the `ready` line with the client endpoint.
//! Children are this same binary; they stop when `up` stops (SIGTERM, a grace period, then SIGKILL; and the kernel's
//! parent-death signal if `up` itself is killed).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use switchyard_coordinator::store::{self, ClusterStore, StoredPlacement};
use switchyard_model::config::ModelConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::commands::remote_generate::{self, RemoteRequest};
use crate::{model_dir, serving};

/// Flags of `up`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory. Default: the built-in tiny model.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Expert worker processes; the coordinator places the experts on them.
    #[arg(long, default_value_t = 2)]
    expert_workers: usize,
    /// Memory each expert worker offers for expert weights: bytes, or with a K/M/G/KiB/MiB/GiB suffix. Default: enough
    /// for every expert of the checkpoint.
    #[arg(long, value_name = "BYTES")]
    expert_memory: Option<String>,
    /// Attention worker processes.
    #[arg(long, default_value_t = 1)]
    attention_workers: usize,
    /// Client endpoint address (the first attention worker's). Default: a free loopback port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Generate for this prompt, print the text, and stop the cluster. Without it, serve until Ctrl-C.
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate for `--prompt`.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: u32,
    /// Dispatch encoding: f32, bf16 or fp8 (per-token scales).
    #[arg(long, default_value = "f32")]
    wire: String,
    /// Combine encoding: f32 or bf16.
    #[arg(long, default_value = "f32")]
    combine: String,
    /// Extra expert replicas per MoE layer beyond one of each expert, given to the hottest experts and spread so that
    /// replicas of an expert sit on different workers; attention workers re-send to a surviving replica when one dies.
    #[arg(long, default_value_t = 0)]
    redundant_slots: usize,
    /// The cluster store: `etcd://HOST:PORT[,HOST:PORT...]`. Default: the coordinator keeps it in memory (and serves
    /// it to the workers), so the cluster lives as long as that one coordinator.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Coordinator processes; one leads, the others take over when it dies. More than one needs `--store`.
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// The cluster's name in the store.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Rebalance when the most loaded expert worker carries this many times the mean load (coordinator default if
    /// not given).
    #[arg(long)]
    rebalance_threshold: Option<f64>,
    /// Least time between two load-driven rebalances, in milliseconds (coordinator default if not given).
    #[arg(long)]
    rebalance_interval_ms: Option<u64>,
    /// How long an attention worker holds a step whose experts were lost, waiting for the coordinator to re-place
    /// them, before it fails the requests in it (attention worker default if not given).
    #[arg(long)]
    recovery_timeout_ms: Option<u64>,
    /// Lease of every member in the store, in milliseconds: a killed worker is noticed within two leases.
    #[arg(long, default_value_t = 2000)]
    lease_ttl_ms: u64,
    /// Micro-batches in flight per attention worker (2 = ping-pong).
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Memory of each attention worker's paged KV cache (bytes, or with a K/M/G or KiB/MiB/GiB suffix). Default: room
    /// for every sequence slot at the model's full context, taken as it is used.
    #[arg(long, value_name = "BYTES")]
    kv_memory: Option<String>,
    /// Tokens one step of an attention worker computes at most (decodes plus chunks of prompts).
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Expert workers quantise activations to FP8 per token.
    #[arg(long)]
    fp8_activations: bool,
    /// Where the expert workers compute: `cpu`, or `cuda:N` for every one of them (FP8 checkpoints).
    #[arg(long, default_value = "cpu")]
    expert_device: switchyard_model::Device,
    /// Where the attention workers compute: `cpu`, or `cuda:N` for the whole attention side of every one of them.
    #[arg(long, default_value = "cpu")]
    attention_device: switchyard_model::Device,
    /// Element type of the attention workers' KV cache on their GPU (`bf16`, the default, or `f32`). Only with
    /// `--attention-device cuda:N`.
    #[arg(long)]
    kv_dtype: Option<switchyard_model::KvDtype>,
    /// Element type of the attention workers' dense weights on their GPU (`bf16`, the default, or `f32`). Only with
    /// `--attention-device cuda:N`.
    #[arg(long)]
    dense_dtype: Option<switchyard_model::DenseDtype>,
    /// Seconds to wait for each process to become ready.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Serve the OpenAI-compatible HTTP API from the first attention worker on this address (port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// Bearer token the HTTP API's /v1 routes want.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true, requires = "http")]
    api_key: Option<String>,
}

/// A started child process.
struct Child {
    role: String,
    pid: u32,
    endpoint: String,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

/// Lines of a child's stderr kept to explain its death.
const STDERR_TAIL: usize = 20;

impl Child {
    fn tail(&self) -> String {
        let tail = self.stderr_tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
        if tail.is_empty() {
            "(it wrote nothing to stderr)".into()
        } else {
            tail.join("\n")
        }
    }
}

/// The children, and a channel on which each one's exit is reported.
struct Cluster {
    children: Vec<Child>,
    exits: mpsc::UnboundedReceiver<(usize, std::io::Result<std::process::ExitStatus>)>,
    exit_sender: mpsc::UnboundedSender<(usize, std::io::Result<std::process::ExitStatus>)>,
    alive: Vec<bool>,
}

impl Cluster {
    fn new() -> Self {
        let (exit_sender, exits) = mpsc::unbounded_channel();
        Self { children: Vec::new(), exits, exit_sender, alive: Vec::new() }
    }

    /// Starts `switchyard ARGS` as `role` and waits for its `listening on URL` line.
    async fn spawn(&mut self, role: String, args: Vec<String>, timeout: Duration) -> Result<String> {
        let exe = std::env::current_exe().context("locating the switchyard binary")?;
        let mut command = Command::new(exe);
        command.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it only asks the kernel to send
        // SIGTERM to the child when this process dies, so no child outlives `up` even after a SIGKILL.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = command.spawn().with_context(|| format!("starting the {role}"))?;
        let pid = process.id().unwrap_or_default();
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        if let Some(stderr) = process.stderr.take() {
            let tail = Arc::clone(&stderr_tail);
            let prefix = role.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[{prefix}] {line}");
                    if let Ok(mut tail) = tail.lock() {
                        if tail.len() == STDERR_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                }
            });
        }
        let stdout = process.stdout.take().context("child stdout")?;
        let index = self.children.len();
        let sender = self.exit_sender.clone();
        tokio::spawn(async move {
            let status = process.wait().await;
            let _ = sender.send((index, status));
        });
        self.children.push(Child { role: role.clone(), pid, endpoint: String::new(), stderr_tail });
        self.alive.push(true);

        let mut lines = BufReader::new(stdout).lines();
        let announced = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Ok::<Option<String>, std::io::Error>(Some(url.trim().to_string()));
                }
            }
            Ok(None)
        })
        .await;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let endpoint = match announced {
            Ok(Ok(Some(url))) => url,
            Ok(_) => {
                // Give the exit watcher a moment so the status is known.
                tokio::time::sleep(Duration::from_millis(200)).await;
                bail!("the {role} exited before it was ready; its last stderr lines:\n{}", self.children[index].tail())
            }
            Err(_) => bail!("the {role} did not start serving within {} s", timeout.as_secs()),
        };
        self.children[index].endpoint = endpoint.clone();
        println!("started {role} (pid {pid}) at {endpoint}");
        Ok(endpoint)
    }

    /// Polls gRPC health until the child answers SERVING.
    async fn wait_serving(&mut self, index: usize, timeout: Duration) -> Result<()> {
        let (role, endpoint) = (self.children[index].role.clone(), self.children[index].endpoint.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no answer");
        while tokio::time::Instant::now() < deadline {
            self.report_exits();
            if !self.alive[index] {
                bail!("the {role} exited while starting; its last stderr lines:\n{}", self.children[index].tail());
            }
            let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
                Ok(e) => e.connect_timeout(Duration::from_secs(1)).connect().await.ok(),
                Err(e) => bail!("the {role} announced an unusable endpoint {endpoint}: {e}"),
            };
            if let Some(channel) = channel {
                let mut client = HealthClient::new(channel);
                match client.check(HealthCheckRequest { service: String::new() }).await {
                    Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
                    Ok(r) => last = format!("status {}", r.get_ref().status),
                    Err(status) => last = status.message().to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the {role} at {endpoint} was not SERVING within {} s (last: {last})", timeout.as_secs())
    }

    /// Reports children that exited since the last call; returns how many did.
    fn report_exits(&mut self) -> usize {
        let mut count = 0;
        while let Ok((index, status)) = self.exits.try_recv() {
            self.note_exit(index, status);
            count += 1;
        }
        count
    }

    fn note_exit(&mut self, index: usize, status: std::io::Result<std::process::ExitStatus>) {
        self.alive[index] = false;
        let child = &self.children[index];
        let status = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown status ({e})"),
        };
        eprintln!(
            "error: the {} (pid {}, {}) exited: {status}; its last stderr lines:\n{}",
            child.role,
            child.pid,
            child.endpoint,
            child.tail()
        );
    }

    fn attention_workers_alive(&self) -> usize {
        self.children.iter().zip(&self.alive).filter(|(c, &alive)| alive && c.role.starts_with("attention")).count()
    }

    /// Stops the children: attention workers first (they hold client streams), then the expert workers they dispatch
    /// to, then the coordinators (one of which may hold the store the others deregister from). Each group gets
    /// SIGTERM, a grace period, then SIGKILL.
    async fn shutdown(&mut self) {
        self.report_exits();
        for prefix in ["attention", "expert", "coordinator"] {
            let group: Vec<usize> =
                (0..self.children.len()).filter(|&i| self.children[i].role.starts_with(prefix)).collect();
            self.stop_group(&group).await;
        }
    }

    async fn stop_group(&mut self, group: &[usize]) {
        for &index in group {
            let child = &self.children[index];
            if self.alive[index] && child.pid != 0 {
                // SAFETY: sending a signal to a pid we started; it has not been reaped (we saw no exit).
                unsafe {
                    libc::kill(child.pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let grace = tokio::time::Instant::now() + Duration::from_secs(5);
        while group.iter().any(|&i| self.alive[i]) {
            match tokio::time::timeout_at(grace, self.exits.recv()).await {
                Ok(Some((index, _))) => self.alive[index] = false,
                Ok(None) | Err(_) => break,
            }
        }
        for &index in group {
            let child = &self.children[index];
            if self.alive[index] && child.pid != 0 {
                eprintln!("the {} did not stop within 5 s; killing it", child.role);
                // SAFETY: as above.
                unsafe {
                    libc::kill(child.pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
}

/// Runs `up`.
pub fn run(args: Args) -> Result<()> {
    if args.attention_workers == 0 {
        bail!("--attention-workers must be at least 1");
    }
    if args.expert_workers == 0 {
        bail!("--expert-workers must be at least 1");
    }
    if args.coordinators == 0 {
        bail!("--coordinators must be at least 1");
    }
    // Before any process starts: a GPU that cannot be used is one clear error, not one per expert worker.
    switchyard_kernels::device::check_device(&args.expert_device)
        .with_context(|| format!("--expert-device {}", args.expert_device))?;
    switchyard_kernels::device::check_device(&args.attention_device)
        .with_context(|| format!("--attention-device {}", args.attention_device))?;
    if args.kv_dtype.is_some() && args.attention_device == switchyard_model::Device::Cpu {
        bail!(
            "--kv-dtype chooses the attention workers' GPU KV cache element type: it needs --attention-device cuda:N \
             (the CPU's cache is f32)"
        );
    }
    if args.dense_dtype.is_some() && args.attention_device == switchyard_model::Device::Cpu {
        bail!(
            "--dense-dtype chooses the attention workers' GPU dense weight type: it needs --attention-device cuda:N \
             (the CPU computes in the checkpoint's precision)"
        );
    }
    if args.coordinators > 1 && args.store.is_none() {
        bail!(
            "--coordinators {} needs --store etcd://...: without it the one coordinator holds the cluster state in \
             memory, so no other could take over",
            args.coordinators
        );
    }
    let dir = model_dir::resolve(args.model.as_deref())?;
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)
        .with_context(|| format!("reading the model config {}", config_path.display()))?;
    let experts = config.text.num_local_experts;
    if args.expert_workers > experts {
        bail!(
            "--expert-workers {} for {experts} experts per layer: each worker needs at least one",
            args.expert_workers
        );
    }
    let runtime = serving::runtime(2)?;
    runtime.block_on(async move {
        let mut cluster = Cluster::new();
        let result = start_and_serve(&args, &dir, &mut cluster).await;
        cluster.shutdown().await;
        result
    })
}

async fn start_and_serve(args: &Args, dir: &std::path::Path, cluster: &mut Cluster) -> Result<()> {
    let timeout = Duration::from_secs(args.ready_timeout);
    let model = dir.to_string_lossy().into_owned();
    let common = |role: &str| -> Vec<String> {
        vec![
            role.to_string(),
            "--model".into(),
            model.clone(),
            "--cluster".into(),
            args.cluster.clone(),
            "--lease-ttl-ms".into(),
            args.lease_ttl_ms.to_string(),
        ]
    };

    let mut coordinator_args = common("coordinator");
    coordinator_args.extend([
        "--expert-workers".into(),
        args.expert_workers.to_string(),
        "--redundant-slots".into(),
        args.redundant_slots.to_string(),
    ]);
    if let Some(threshold) = args.rebalance_threshold {
        coordinator_args.extend(["--rebalance-threshold".into(), threshold.to_string()]);
    }
    if let Some(interval) = args.rebalance_interval_ms {
        coordinator_args.extend(["--rebalance-interval-ms".into(), interval.to_string()]);
    }
    let mut coordinators = Vec::new();
    let store_url = match &args.store {
        Some(url) => {
            for i in 0..args.coordinators {
                let id = format!("c-{i}");
                let mut child_args = coordinator_args.clone();
                child_args.extend(["--store".into(), url.clone(), "--id".into(), id.clone()]);
                coordinators.push(cluster.spawn(format!("coordinator {id}"), child_args, timeout).await?);
            }
            url.clone()
        }
        None => {
            let endpoint = cluster.spawn("coordinator".into(), coordinator_args, timeout).await?;
            coordinators.push(endpoint.clone());
            endpoint
        }
    };

    let mut expert_endpoints = Vec::new();
    for i in 0..args.expert_workers {
        let id = format!("ew-{i}");
        let mut child_args = common("expert-worker");
        child_args.extend(["--store".into(), store_url.clone(), "--worker-id".into(), id.clone()]);
        if let Some(memory) = &args.expert_memory {
            child_args.extend(["--memory-budget".into(), memory.clone()]);
        }
        if args.fp8_activations {
            child_args.push("--fp8-activations".into());
        }
        child_args.extend(["--device".into(), args.expert_device.to_string()]);
        let endpoint = cluster.spawn(format!("expert worker {id}"), child_args, timeout).await?;
        expert_endpoints.push(format!("{id}={endpoint}"));
    }

    let placement = wait_for_placement(cluster, &store_url, &args.cluster, timeout).await?;

    // Port 0 is resolved here so that the ready line can name the port the worker serves HTTP on.
    let http = match args.http {
        Some(addr) if addr.port() == 0 => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.local_addr())
                .with_context(|| format!("finding a free port for --http {addr}"))?,
        ),
        other => other,
    };
    let mut attention_endpoints = Vec::new();
    for i in 0..args.attention_workers {
        let listen = match (i, args.listen) {
            (0, Some(addr)) => addr.to_string(),
            _ => "127.0.0.1:0".into(),
        };
        let id = format!("aw-{i}");
        let mut child_args = common("attention-worker");
        child_args.extend([
            "--store".into(),
            store_url.clone(),
            "--listen".into(),
            listen,
            "--worker-id".into(),
            id.clone(),
            "--wire".into(),
            args.wire.clone(),
            "--combine".into(),
            args.combine.clone(),
            "--micro-batches".into(),
            args.micro_batches.to_string(),
            "--device".into(),
            args.attention_device.to_string(),
        ]);
        if let Some(memory) = &args.kv_memory {
            child_args.extend(["--kv-memory".into(), memory.clone()]);
        }
        if let Some(kv_dtype) = args.kv_dtype {
            child_args.extend(["--kv-dtype".into(), kv_dtype.to_string()]);
        }
        if let Some(dense_dtype) = args.dense_dtype {
            child_args.extend(["--dense-dtype".into(), dense_dtype.to_string()]);
        }
        if let Some(tokens) = args.max_batch_tokens {
            child_args.extend(["--max-batch-tokens".into(), tokens.to_string()]);
        }
        if let Some(recovery) = args.recovery_timeout_ms {
            child_args.extend(["--recovery-timeout-ms".into(), recovery.to_string()]);
        }
        if let (0, Some(http)) = (i, http) {
            child_args.extend(["--http".into(), http.to_string()]);
            if let Some(key) = &args.api_key {
                child_args.extend(["--api-key".into(), key.clone()]);
            }
        }
        attention_endpoints.push(cluster.spawn(format!("attention worker {id}"), child_args, timeout).await?);
    }
    for index in 0..cluster.children.len() {
        cluster.wait_serving(index, timeout).await?;
    }
    let client = attention_endpoints[0].clone();
    println!(
        "ready: client endpoint {client} (store {store_url}; placement epoch {}; attention workers: {}; expert \
         workers: {}; coordinators: {}{})",
        placement.placement.epoch,
        attention_endpoints.join(", "),
        expert_endpoints.join(", "),
        coordinators.join(", "),
        http.map(|addr| format!("; http http://{addr}")).unwrap_or_default(),
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    if let Some(prompt) = &args.prompt {
        let request = RemoteRequest {
            prompt: RemoteRequest::prompt_from(Some(prompt.clone()), None)?,
            max_new_tokens: args.max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            ignore_eos: false,
            return_logits: false,
        };
        let generation = remote_generate::generate(&client, request, &mut |_| {}).await?;
        println!("{}", generation.text);
        return Ok(());
    }

    let shutdown = serving::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            exit = cluster.exits.recv() => {
                let Some((index, status)) = exit else { return Ok(()) };
                cluster.note_exit(index, status);
                if cluster.attention_workers_alive() == 0 {
                    bail!("no attention worker is left; stopping the cluster");
                }
                eprintln!("the cluster keeps serving with the remaining processes");
            }
        }
    }
}

/// Waits until the coordinator has published the first placement (the expert workers loaded their experts), failing
/// at once when it reports the experts cannot be placed or a child dies meanwhile.
async fn wait_for_placement(
    cluster: &mut Cluster,
    store_url: &str,
    cluster_name: &str,
    timeout: Duration,
) -> Result<StoredPlacement> {
    let store =
        store::connect(store_url).await.with_context(|| format!("connecting to the cluster store {store_url}"))?;
    let state = ClusterStore::new(store, cluster_name).context("opening the cluster state")?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no status yet");
    loop {
        if cluster.report_exits() > 0 {
            bail!("a process of the cluster exited before the experts were placed (see above)");
        }
        match state.placement().await {
            Ok(Some(placement)) => return Ok(placement),
            Ok(None) => {}
            Err(e) => last = format!("reading the placement: {e}"),
        }
        match state.coordinator_status().await {
            Ok(Some(status)) if status.state == "unplaceable" => bail!(
                "the coordinator cannot place the experts: {}",
                status.problem.unwrap_or_else(|| "no reason given".into())
            ),
            Ok(Some(status)) => {
                last = format!("coordinator {} is {}", status.leader, status.state);
                if let Some(problem) = status.problem {
                    last.push_str(&format!(": {problem}"));
                }
            }
            Ok(None) => {}
            Err(e) => last = format!("reading the coordinator status: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the coordinator published no placement within {} s (last: {last})", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
