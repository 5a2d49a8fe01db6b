//! [`EtcdServer`]: a throwaway single-member etcd on loopback, for tests and local clusters.
//!
//! It runs the `etcd` binary (Debian package `etcd-server`) on free loopback ports with its own data directory and
//! fast raft timings (`--heartbeat-interval=10 --election-timeout=100`: it serves in about 0.1 s). It can be killed
//! and started again on the same ports and data, which is how tests exercise an etcd restart. Dropping it kills the
//! process and deletes the directory.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::CoordinatorError;

/// How long a start may take before it counts as failed.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A running (or stopped) local etcd.
pub struct EtcdServer {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports with a fresh data directory; returns once it has a raft leader.
    ///
    /// Fails with a message saying to install `etcd-server` if there is no `etcd` binary on `PATH` (or at
    /// `$ETCD_BIN`).
    pub fn start() -> Result<Self, CoordinatorError> {
        let binary = find_etcd()?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        let mut server = Self { binary, dir, client_port: free_port()?, peer_port: free_port()?, child: None };
        server.launch()?;
        Ok(server)
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Kills etcd (SIGKILL, no clean shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory (after [`EtcdServer::kill`]).
    pub fn restart(&mut self) -> Result<(), CoordinatorError> {
        self.kill();
        self.launch()
    }

    /// etcd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn launch(&mut self) -> Result<(), CoordinatorError> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| failed(format!("cannot open {}: {e}", self.log_path().display())))?;
        let log_err = log.try_clone().map_err(|e| failed(format!("cannot open etcd's log twice: {e}")))?;
        let child = Command::new(&self.binary)
            .arg("--name=switchyard-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=switchyard-test={peer}"))
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=100")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| failed(format!("cannot run {}: {e}", self.binary.display())))?;
        self.child = Some(child);
        self.wait_healthy()
    }

    /// Waits until `/health` says etcd has a leader, failing early (with its log) if the process dies.
    fn wait_healthy(&mut self) -> Result<(), CoordinatorError> {
        let start = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        while start.elapsed() < START_DEADLINE {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(failed(format!("etcd exited with {status} while starting; its log:\n{}", self.log())));
                }
            }
            if health(addr) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = self.log();
        self.kill();
        Err(failed(format!("etcd was not healthy within {START_DEADLINE:?}; its log:\n{log}")))
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn failed(reason: String) -> CoordinatorError {
    CoordinatorError::LocalEtcd { reason }
}

fn find_etcd() -> Result<PathBuf, CoordinatorError> {
    find_etcd_in(std::env::var_os("ETCD_BIN"), std::env::var_os("PATH").unwrap_or_default())
}

/// `$ETCD_BIN` if set, else the first executable `etcd` on `path`.
fn find_etcd_in(etcd_bin: Option<OsString>, path: OsString) -> Result<PathBuf, CoordinatorError> {
    const INSTALL: &str = "install it with `apt-get install etcd-server` (or run scripts/ensure-deps.sh)";
    if let Some(bin) = etcd_bin {
        let bin = PathBuf::from(bin);
        if is_executable(&bin) {
            return Ok(bin);
        }
        return Err(failed(format!(
            "ETCD_BIN={} is not an executable file: {INSTALL}, or fix ETCD_BIN",
            bin.display()
        )));
    }
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| failed(format!("the `etcd` binary is not on PATH: {INSTALL}, or point ETCD_BIN at it")))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn free_port() -> Result<u16, CoordinatorError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| failed(format!("cannot bind a loopback port: {e}")))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| failed(format!("cannot read a bound port: {e}")))
}

fn health(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_etcd_says_how_to_install_it() {
        let dir = std::env::temp_dir();
        let err = find_etcd_in(None, dir.join("no-such-dir").into_os_string()).expect_err("no etcd there");
        assert!(err.to_string().contains("apt-get install etcd-server"), "{err}");
        let err = find_etcd_in(Some("/no/such/etcd".into()), OsString::new()).expect_err("bad ETCD_BIN");
        assert!(err.to_string().contains("ETCD_BIN=/no/such/etcd") && err.to_string().contains("etcd-server"), "{err}");
    }
}
