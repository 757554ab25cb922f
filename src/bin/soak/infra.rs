//! What the soak runs and breaks: a private redis-server (or a private
//! Redis Cluster of 3 primaries + 3 replicas), a throwaway PostgreSQL (a
//! database on a given server, or a cluster of its own), one loopback TCP
//! proxy per replica in front of the single Redis, and the gateway replicas
//! as real processes. Every child is killed when its guard drops.

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

/// One command to one server on loopback (not cluster-aware: no redirects).
pub async fn node_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
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

/// A command's reply as text (`CLUSTER INFO`, `CLUSTER NODES`, `INFO`).
pub async fn node_text(port: u16, args: &[&str]) -> Option<String> {
    match node_cmd(port, args).await.ok()? {
        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
        redis::Value::VerbatimString { text, .. } => Some(text),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::Okay => Some("OK".into()),
        _ => None,
    }
}

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
        node_cmd(self.port, args).await
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

// ---------------------------------------------------------------- Redis Cluster

/// Failure detection of the soak's cluster: short enough that a killed
/// primary is replaced within seconds, long enough that a busy 2-core
/// machine does not fail nodes over on its own.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2000;
/// Primaries of the soak's cluster (each with one replica).
pub const CLUSTER_PRIMARIES: usize = 3;

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    pub failed: bool,
    pub slots: Vec<(u16, u16)>,
}

impl NodeInfo {
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    pub fn slot_count(&self) -> usize {
        self.slots.iter().map(|&(a, b)| (b - a) as usize + 1).sum()
    }
}

/// One cluster node: fixed ports and config file for life, so a killed node
/// is started again as the same node (it rejoins, as a replica once its
/// slots went to the replica that replaced it).
struct ClusterNode {
    port: u16,
    bus: u16,
    child: Option<Child>,
}

/// A private Redis Cluster: 3 primaries + 3 replicas on loopback, formed
/// with `redis-cli --cluster create` (the approach of tests/it/ha.rs).
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

impl RedisCluster {
    pub async fn start(work: &Path) -> anyhow::Result<RedisCluster> {
        let dir = work.join("cluster");
        std::fs::create_dir_all(&dir)?;
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..2 * CLUSTER_PRIMARIES {
            let mut started = false;
            // Again on other ports when another process took one between
            // `free_port` and the bind.
            for _ in 0..5 {
                let mut node = ClusterNode {
                    port: free_port(),
                    bus: free_port(),
                    child: None,
                };
                if cluster.spawn(&mut node).await.is_ok() {
                    cluster.nodes.push(node);
                    started = true;
                    break;
                }
                if let Some(mut c) = node.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            if !started {
                bail!("a cluster redis-server did not start on any free port");
            }
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = tokio::process::Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await
            .context("redis-cli is installed (scripts/test.sh installs it)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        cluster.wait_healthy(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    async fn spawn(&self, node: &mut ClusterNode) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("redis-{}.log", node.port)))?;
        let child = Command::new("redis-server")
            .args(["--port", &node.port.to_string()])
            .args(["--cluster-port", &node.bus.to_string()])
            .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{}.conf", node.port)))
            .args([
                "--cluster-node-timeout",
                &CLUSTER_NODE_TIMEOUT_MS.to_string(),
            ])
            // A replica may always take over, however long it was cut off.
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--dbfilename", &format!("dump-{}.rdb", node.port)])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("redis-server is installed (scripts/test.sh installs it)")?;
        node.child = Some(child);
        for _ in 0..400 {
            if let Some(c) = &mut node.child
                && let Ok(Some(_)) = c.try_wait()
            {
                bail!("redis-server exited at start on {}", node.port);
            }
            if node_cmd(node.port, &["PING"]).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("redis-server did not start on {}", node.port)
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `REDIS_CLUSTER_URLS` for the gateway: every node as a seed.
    pub fn urls(&self) -> String {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn alive_ports(&mut self) -> Vec<u16> {
        self.nodes
            .iter_mut()
            .filter_map(|n| {
                let running = n
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
                running.then_some(n.port)
            })
            .collect()
    }

    /// The cluster as the first live node that answers sees it.
    pub async fn topology(&mut self) -> anyhow::Result<Vec<NodeInfo>> {
        for port in self.alive_ports() {
            if let Some(text) = node_text(port, &["CLUSTER", "NODES"]).await {
                return Ok(parse_nodes(&text));
            }
        }
        bail!("no live cluster node answers CLUSTER NODES")
    }

    /// Live, slot-owning primaries, in node order.
    pub async fn primaries(&mut self) -> anyhow::Result<Vec<NodeInfo>> {
        let alive = self.alive_ports();
        let topo = self.topology().await?;
        Ok(self.in_node_order(
            topo.into_iter()
                .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
                .filter(|n| alive.contains(&n.port))
                .collect(),
        ))
    }

    /// Live replicas, in node order.
    pub async fn replicas(&mut self) -> anyhow::Result<Vec<NodeInfo>> {
        let alive = self.alive_ports();
        let topo = self.topology().await?;
        Ok(self.in_node_order(
            topo.into_iter()
                .filter(|n| !n.primary && !n.failed && alive.contains(&n.port))
                .collect(),
        ))
    }

    fn in_node_order(&self, mut nodes: Vec<NodeInfo>) -> Vec<NodeInfo> {
        let index = |p: u16| self.nodes.iter().position(|n| n.port == p);
        nodes.sort_by_key(|n| index(n.port));
        nodes
    }

    /// Every node running, `cluster_state:ok` on each, all of them agreeing
    /// on who owns which slots, 3 primaries owning them all and every other
    /// node a replica whose link to its primary is up.
    pub async fn healthy(&mut self) -> bool {
        let alive = self.alive_ports();
        if alive.len() != self.nodes.len() {
            return false;
        }
        let mut views = Vec::new();
        for &port in &alive {
            match node_text(port, &["CLUSTER", "INFO"]).await {
                Some(info) if info.contains("cluster_state:ok") => {}
                _ => return false,
            }
            let Some(text) = node_text(port, &["CLUSTER", "NODES"]).await else {
                return false;
            };
            let mut owners: Vec<(String, Vec<(u16, u16)>)> = parse_nodes(&text)
                .into_iter()
                .filter(|n| n.primary && !n.failed && !n.slots.is_empty())
                .map(|n| (n.id, n.slots))
                .collect();
            owners.sort();
            views.push((parse_nodes(&text), owners));
        }
        let (topo, owners) = &views[0];
        if views.iter().any(|(_, o)| o != owners) || owners.len() != CLUSTER_PRIMARIES {
            return false;
        }
        let covered: usize = topo
            .iter()
            .filter(|n| owners.iter().any(|(id, _)| *id == n.id))
            .map(NodeInfo::slot_count)
            .sum();
        if covered != 16384 {
            return false;
        }
        for n in topo {
            if n.failed {
                return false;
            }
            if owners.iter().any(|(id, _)| *id == n.id) {
                continue;
            }
            if n.primary {
                // A primary without slots: not the shape we keep.
                return false;
            }
            match node_text(n.port, &["INFO", "replication"]).await {
                Some(info) if info.contains("master_link_status:up") => {}
                _ => return false,
            }
        }
        true
    }

    pub async fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.healthy().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "cluster not healthy within {} s: {:?}",
                    limit.as_secs(),
                    self.topology().await.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL the node on `port` (no goodbye to the cluster).
    pub fn kill(&mut self, port: u16) {
        for n in &mut self.nodes {
            if n.port == port
                && let Some(mut c) = n.child.take()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Start the node on `port` again, same ports and config file.
    pub async fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        let Some(i) = self.nodes.iter().position(|n| n.port == port) else {
            bail!("no cluster node on {port}");
        };
        let mut node = ClusterNode {
            port,
            bus: self.nodes[i].bus,
            child: self.nodes[i].child.take(),
        };
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let r = self.spawn(&mut node).await;
        self.nodes[i].child = node.child;
        r
    }

    /// Wait until a live primary other than `old_id` owns `slot` and says
    /// `cluster_state:ok`; returns it.
    pub async fn wait_promoted(
        &mut self,
        slot: u16,
        old_id: &str,
        limit: Duration,
    ) -> anyhow::Result<NodeInfo> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(topo) = self.topology().await
                && let Some(n) = topo
                    .into_iter()
                    .find(|n| n.primary && !n.failed && n.id != old_id && n.owns(slot))
                && node_text(n.port, &["CLUSTER", "INFO"])
                    .await
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            {
                return Ok(n);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "no replica took over slot {slot} within {} s",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `CLUSTER FAILOVER` on the replica on `port` (graceful: its primary
    /// stops writes, the replica catches up, then takes over); waits until
    /// it is a primary.
    pub async fn failover(&mut self, port: u16, limit: Duration) -> anyhow::Result<()> {
        let r = node_cmd(port, &["CLUSTER", "FAILOVER"]).await;
        r.with_context(|| format!("CLUSTER FAILOVER on {port}"))?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if node_text(port, &["INFO", "replication"])
                .await
                .is_some_and(|i| i.contains("role:master"))
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{port} not a primary {} s after CLUSTER FAILOVER",
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Move one slot, with its keys, from the primary `from` to `to`: the
    /// steps `redis-cli --cluster reshard` takes for each slot (IMPORTING,
    /// MIGRATING, MIGRATE the keys 100 at a time, SETSLOT NODE everywhere).
    pub async fn move_slot(
        &mut self,
        slot: u16,
        from: &NodeInfo,
        to: &NodeInfo,
    ) -> anyhow::Result<usize> {
        let s = slot.to_string();
        node_cmd(to.port, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from.id])
            .await
            .context("SETSLOT IMPORTING")?;
        node_cmd(from.port, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to.id])
            .await
            .context("SETSLOT MIGRATING")?;
        let mut moved = 0;
        loop {
            let v = node_cmd(from.port, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .await
                .context("GETKEYSINSLOT")?;
            let keys: Vec<String> = redis::from_redis_value(v).context("GETKEYSINSLOT reply")?;
            if keys.is_empty() {
                break;
            }
            let port = to.port.to_string();
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                &port,
                "",
                "0",
                "5000",
                "REPLACE",
                "KEYS",
            ];
            args.extend(keys.iter().map(String::as_str));
            node_cmd(from.port, &args).await.context("MIGRATE")?;
            moved += keys.len();
        }
        // Tell the target first, then the source, then everyone (as
        // redis-cli does).
        let topo = self.topology().await?;
        let mut primaries: Vec<&NodeInfo> =
            topo.iter().filter(|n| n.primary && !n.failed).collect();
        primaries.sort_by_key(|n| (n.id != to.id, n.id != from.id));
        for n in primaries {
            let _ = node_cmd(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.id]).await;
        }
        Ok(moved)
    }

    /// Move `count` slots from `from` to `to` with `redis-cli --cluster
    /// reshard`.
    pub async fn reshard(
        &mut self,
        from: &NodeInfo,
        to: &NodeInfo,
        count: u32,
    ) -> anyhow::Result<()> {
        let out = tokio::process::Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", to.port),
                "--cluster-from",
                &from.id,
                "--cluster-to",
                &to.id,
                "--cluster-slots",
                &count.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .context("redis-cli")?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            bail!("redis-cli --cluster reshard failed: {}", tail.join(" | "));
        }
        Ok(())
    }

    /// End of the run: every node running again, the cluster whole.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        let alive = self.alive_ports();
        for port in self.ports() {
            if !alive.contains(&port) {
                self.restart(port).await?;
            }
        }
        self.wait_healthy(Duration::from_secs(60)).await
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for port in self.ports() {
            self.kill(port);
        }
    }
}

fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            // "127.0.0.1:7000@17000" (possibly ",hostname")
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = f[2];
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            Some(NodeInfo {
                id: f[0].to_string(),
                port,
                primary: flags.contains("master"),
                failed: flags.contains("fail"),
                slots,
            })
        })
        .collect()
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
/// Redis (single mode; in cluster mode the replica reaches the nodes the
/// cluster names directly, from `REDIS_CLUSTER_URLS` in the spec), a
/// process that is killed and started again.
pub struct Replica {
    pub slot: usize,
    pub addr: SocketAddr,
    pub proxy: Option<Proxy>,
    pub generation: u32,
    pub instance_id: String,
    child: Option<Child>,
}

impl Replica {
    pub fn new(slot: usize, proxy: Option<Proxy>) -> Replica {
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
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("BIND_ADDR", self.addr.to_string())
            .env("INSTANCE_ID", &self.instance_id);
        if let Some(proxy) = &self.proxy {
            command.env("REDIS_URL", proxy.url());
        }
        let child = command
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
