//! What the soak runs and breaks: a private redis-server, a throwaway
//! PostgreSQL (a database on a given server, or a cluster of its own), one
//! loopback TCP proxy per replica in front of Redis, and the gateway
//! replicas as real processes. Every child is killed when its guard drops.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener as TokioListener, TcpStream};
use tokio::sync::watch;
use uuid::Uuid;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

// ---------------------------------------------------------------- Redis

/// A private redis-server. Its RDB file lives in the work directory so a
/// restart can keep the data (clean restart), roll it back to the last
/// periodic `BGSAVE` (what an async replica promotion or a restore does), or
/// lose it all.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub async fn start(dir: &Path) -> anyhow::Result<Redis> {
        let mut r = Redis {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", "dump.rdb"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("redis-server is installed (scripts/test.sh installs it)")?;
        self.child = Some(child);
        for _ in 0..400 {
            if self.cmd(&["PING"]).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("redis-server did not start on {}", self.port)
    }

    pub async fn cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::other("connect timeout")))??;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut conn))
            .await
            .map_err(|_| redis::RedisError::from(std::io::Error::other("command timeout")))?
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `SHUTDOWN SAVE`, then start again from that file: nothing is lost.
    pub async fn restart_clean(&mut self) -> anyhow::Result<()> {
        let _ = self.cmd(&["SHUTDOWN", "SAVE"]).await;
        if let Some(mut c) = self.child.take() {
            for _ in 0..200 {
                if c.try_wait()?.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn().await
    }

    /// SIGKILL, then start from the last periodic `BGSAVE`: the writes since
    /// then are lost, the ones before it come back.
    pub async fn restart_rolled_back(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// SIGKILL and start empty.
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("dump.rdb"));
        self.spawn().await
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// Where the soak's database lives.
pub enum Postgres {
    /// A database created on someone else's server, dropped at the end.
    External { admin: String, name: String },
    /// A cluster of our own (initdb), so it can be restarted as a fault.
    Own(OwnCluster),
}

pub struct OwnCluster {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    as_nobody: bool,
}

impl Postgres {
    pub async fn external(admin: &str) -> anyhow::Result<(Postgres, String)> {
        let name = format!("og_soak_{}", Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(admin)
            .await
            .with_context(|| format!("PostgreSQL reachable at {admin}"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await?;
        pool.close().await;
        let (base, _) = admin
            .rsplit_once('/')
            .context("database URL ends in /<database>")?;
        let url = format!("{base}/{name}");
        Ok((
            Postgres::External {
                admin: admin.to_string(),
                name,
            },
            url,
        ))
    }

    /// initdb + pg_ctl start in `dir`, as `nobody` when running as root
    /// (PostgreSQL refuses root), exactly as scripts/test.sh does.
    pub async fn own(dir: &Path) -> anyhow::Result<(Postgres, String)> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL binaries in /usr/lib/postgresql (scripts/test.sh installs them)")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").is_file())
            .max_by_key(|p| {
                p.parent()
                    .and_then(|v| v.file_name())
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .context("no initdb under /usr/lib/postgresql/*/bin")?;
        let pg_dir = dir.join("pg");
        std::fs::create_dir_all(&pg_dir)?;
        let as_nobody = is_root();
        if as_nobody {
            let ok = Command::new("chown")
                .args(["nobody"])
                .arg(&pg_dir)
                .status()?
                .success();
            if !ok {
                bail!("chown nobody {}", pg_dir.display());
            }
        }
        let cluster = OwnCluster {
            bin,
            data: pg_dir.join("data"),
            log: pg_dir.join("log"),
            port: free_port(),
            as_nobody,
        };
        let out = cluster
            .command("initdb")
            .arg("-D")
            .arg(&cluster.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        cluster.pg_ctl(&["start"])?;
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
        let pool = sqlx::PgPool::connect(&admin).await?;
        sqlx::query("CREATE DATABASE og_soak")
            .execute(&pool)
            .await?;
        pool.close().await;
        let url = format!("postgres://postgres@127.0.0.1:{}/og_soak", cluster.port);
        Ok((Postgres::Own(cluster), url))
    }

    pub fn own_cluster(&self) -> Option<&OwnCluster> {
        match self {
            Postgres::Own(c) => Some(c),
            Postgres::External { .. } => None,
        }
    }
}

impl OwnCluster {
    fn command(&self, tool: &str) -> Command {
        let mut c = if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(self.bin.join(tool));
            c
        } else {
            Command::new(self.bin.join(tool))
        };
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    }

    /// `pg_ctl <action>` with the soak's settings; waits for completion.
    pub fn pg_ctl(&self, action: &[&str]) -> anyhow::Result<()> {
        let sock_dir = self.data.parent().unwrap_or(&self.data);
        // `synchronous_commit=on`: a commit is acknowledged only once its WAL
        // is written, so `pg-restart -m immediate` (a crash of the server's
        // processes) loses nothing it acknowledged, as in production. With it
        // off, the restart rolled rows back below the poller's cursor, which
        // change capture by `updated_at` cannot see (docs/RELIABILITY.md).
        // `fsync=off` stays: the OS keeps what was written across a process
        // crash, and the soak never crashes the OS.
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200 -c fsync=off \
             -c synchronous_commit=on -c full_page_writes=off",
            self.port,
            sock_dir.display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "30", "-o", &opts])
            .args(action)
            .stderr(Stdio::piped())
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl {action:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        match self {
            Postgres::Own(c) => {
                let _ = c.pg_ctl(&["-m", "immediate", "stop"]);
            }
            Postgres::External { admin, name } => {
                let (admin, name) = (admin.clone(), name.clone());
                // Drop may run inside a runtime: use a thread of its own.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .execute(&pool)
                            .await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

// ---------------------------------------------------------------- proxy

/// A loopback TCP proxy between one replica and Redis that can fail
/// silently: it stops forwarding bytes but keeps both sockets open, like a
/// middlebox that lost its state or a Redis host that vanished.
#[derive(Clone)]
pub struct Proxy {
    pub port: u16,
    inner: Arc<ProxyInner>,
}

struct ProxyInner {
    upstream: AtomicU64,
    /// false while partitioned: no byte moves on any connection.
    forwarding: watch::Sender<bool>,
    /// Bumped to drop every connection open at that moment.
    reset: watch::Sender<u64>,
    /// Open connections, to mark pub/sub ones deaf.
    conns: Mutex<Vec<Weak<ConnFlags>>>,
}

#[derive(Default)]
struct ConnFlags {
    /// The client sent (S|P)SUBSCRIBE on it: the replica's pub/sub link.
    pubsub: AtomicBool,
    /// Server-to-client bytes stop for good on this connection.
    deaf: AtomicBool,
}

impl Proxy {
    pub async fn start(upstream_port: u16) -> anyhow::Result<Proxy> {
        let listener = TokioListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let inner = Arc::new(ProxyInner {
            upstream: AtomicU64::new(upstream_port as u64),
            forwarding: watch::channel(true).0,
            reset: watch::channel(0).0,
            conns: Mutex::new(Vec::new()),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let i = i.clone();
                tokio::spawn(async move { i.serve(client).await });
            }
        });
        Ok(Proxy { port, inner })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stop forwarding on every connection, open or new; sockets stay open.
    pub fn partition(&self) {
        self.inner.forwarding.send_replace(false);
    }

    /// End a partition. `drop_stalled`: close the connections that were
    /// stalled (the middlebox forgot them); otherwise their bytes flow again.
    pub fn heal(&self, drop_stalled: bool) {
        if drop_stalled {
            self.inner.reset.send_modify(|g| *g += 1);
        }
        self.inner.forwarding.send_replace(true);
    }

    /// Make the current pub/sub connections deaf for good: the replica can
    /// still send (SUBSCRIBE, PING…) but nothing comes back. Returns how many.
    pub fn deafen_pubsub(&self) -> usize {
        let conns = self.inner.conns.lock().expect("proxy lock");
        let mut n = 0;
        for c in conns.iter().filter_map(Weak::upgrade) {
            if c.pubsub.load(Ordering::Relaxed) {
                c.deaf.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        n
    }
}

impl ProxyInner {
    async fn serve(self: Arc<Self>, client: TcpStream) {
        let port = self.upstream.load(Ordering::Relaxed) as u16;
        let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
            return;
        };
        let flags = Arc::new(ConnFlags::default());
        {
            let mut conns = self.conns.lock().expect("proxy lock");
            conns.retain(|w| w.strong_count() > 0);
            conns.push(Arc::downgrade(&flags));
        }
        let mut reset = self.reset.subscribe();
        reset.borrow_and_update();
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let up = pump(cr, sw, self.forwarding.subscribe(), flags.clone(), true);
        let down = pump(sr, cw, self.forwarding.subscribe(), flags.clone(), false);
        tokio::select! {
            _ = up => {}
            _ = down => {}
            _ = reset.changed() => {}
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut forwarding: watch::Receiver<bool>,
    flags: Arc<ConnFlags>,
    client_to_server: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if forwarding.wait_for(|f| *f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if client_to_server && contains_subscribe(&buf[..n]) {
            flags.pubsub.store(true, Ordering::Relaxed);
        }
        // Bytes read during a partition are held, not dropped: TCP would
        // deliver them late too.
        if forwarding.wait_for(|f| *f).await.is_err() {
            return;
        }
        if !client_to_server && flags.deaf.load(Ordering::Relaxed) {
            // Swallow everything from now on, keep the socket open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn contains_subscribe(bytes: &[u8]) -> bool {
    bytes
        .windows(9)
        .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
}

// ---------------------------------------------------------------- replicas

/// How a replica process is launched.
#[derive(Clone)]
pub struct ReplicaSpec {
    /// Program and leading args (`<soak> serve` or `<orders-gateway>`).
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log_dir: PathBuf,
}

/// One replica slot: fixed port (as behind a load balancer), fixed proxy to
/// Redis, a process that is killed and started again.
pub struct Replica {
    pub slot: usize,
    pub addr: SocketAddr,
    pub proxy: Proxy,
    pub generation: u32,
    pub instance_id: String,
    child: Option<Child>,
}

impl Replica {
    pub fn new(slot: usize, proxy: Proxy) -> Replica {
        let port = free_port();
        Replica {
            slot,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            proxy,
            generation: 0,
            instance_id: String::new(),
            child: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Start the process (new generation, new INSTANCE_ID); returns once
    /// `/healthz` answers.
    pub async fn spawn(&mut self, spec: &ReplicaSpec) -> anyhow::Result<()> {
        self.generation += 1;
        self.instance_id = format!("soak-r{}-g{}", self.slot, self.generation);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_dir.join(format!("replica-{}.log", self.slot)))?;
        let child = Command::new(&spec.program)
            .args(&spec.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("BIND_ADDR", self.addr.to_string())
            .env("INSTANCE_ID", &self.instance_id)
            .env("REDIS_URL", self.proxy.url())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", spec.program.display()))?;
        self.child = Some(child);
        let client = reqwest::Client::new();
        for _ in 0..800 {
            if let Ok(r) = client
                .get(format!("http://{}/healthz", self.addr))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if !self.is_running() {
                bail!(
                    "replica {} exited at start (see replica-{}.log)",
                    self.slot,
                    self.slot
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("replica {} did not become healthy", self.slot)
    }

    pub fn send(&self, sig: &str) -> bool {
        self.pid().is_some_and(|pid| signal(pid, sig))
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the drain to finish (SIGKILL after `limit`).
    /// Returns the exit code, if it exited on its own.
    pub async fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process would not die of SIGKILL until continued.
            signal(c.id(), "CONT");
        }
        self.kill();
    }
}
