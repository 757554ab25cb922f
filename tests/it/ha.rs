//! Test harness for Redis in its highly available shapes: a real Redis
//! Cluster (3 primaries + 3 replicas) and a real Sentinel setup (a master, a
//! replica and three sentinels), each on free loopback ports, private to one
//! test and torn down (processes killed, files removed) on drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::support::{TcpProxy, free_port};

/// One redis-server (or sentinel) process we started.
struct Proc {
    port: u16,
    child: Option<Child>,
}

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL: no goodbye to the cluster
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed (scripts/test.sh installs it)")
}

/// One command to one server (not cluster-aware).
pub async fn node_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut conn))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "command timed out")))?
}

pub async fn node_text(port: u16, args: &[&str]) -> Option<String> {
    match node_cmd(port, args).await.ok()? {
        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
        redis::Value::VerbatimString { text, .. } => Some(text),
        redis::Value::SimpleString(s) => Some(s),
        redis::Value::Okay => Some("OK".into()),
        _ => None,
    }
}

async fn wait_ping(port: u16) {
    for _ in 0..200 {
        if node_cmd(port, &["PING"]).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis-server did not start on {port}");
}

/// Start a server with the args `make(port, second_port)` builds, on fresh
/// free ports; again on other ports when it exits at once (another process
/// took a port between `free_port` and the bind).
async fn spawn_on_free_ports(make: impl Fn(u16, u16) -> Vec<String>) -> Proc {
    for _ in 0..5 {
        let (port, second) = (free_port(), free_port());
        let mut child = spawn(&make(port, second));
        for _ in 0..200 {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if node_cmd(port, &["PING"]).await.is_ok() {
                return Proc {
                    port,
                    child: Some(child),
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("redis-server did not start on any free port");
}

fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("og-{kind}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Hash slot of a key or channel (CRC16-XMODEM of its hash tag, mod 16384).
pub fn key_slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let hashed = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

// ---------------------------------------------------------------- Redis Cluster

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub primary: bool,
    pub failed: bool,
    pub slots: Vec<(u16, u16)>,
}

pub struct RedisCluster {
    nodes: Vec<Proc>,
    dir: PathBuf,
    /// With [`RedisCluster::start_behind_proxies`], one per node: the
    /// address each node announces to clients (`cluster-announce-port`).
    proxies: Vec<TcpProxy>,
}

impl RedisCluster {
    /// Three primaries with one replica each, every slot covered, replicas
    /// in sync: ready for traffic and for failovers.
    pub async fn start() -> RedisCluster {
        Self::start_with(false).await
    }

    /// [`RedisCluster::start`], each node announcing a [`TcpProxy`] in
    /// front of it as its address: clients (and replication) go through
    /// the proxies, which can freeze the connections open now
    /// ([`RedisCluster::stall_clients`]) while new ones work.
    pub async fn start_behind_proxies() -> RedisCluster {
        Self::start_with(true).await
    }

    async fn start_with(proxied: bool) -> RedisCluster {
        let dir = scratch_dir("cluster");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let node_args = |port: u16, bus: u16| -> Vec<String> {
                [
                    "--port",
                    &port.to_string(),
                    "--cluster-port",
                    &bus.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &dir.join(format!("nodes-{port}.conf")).to_string_lossy(),
                    // Fast failure detection so failover tests take seconds.
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                    "--dir",
                    &dir.to_string_lossy(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            };
            nodes.push(spawn_on_free_ports(node_args).await);
        }
        let mut proxies = Vec::new();
        if proxied {
            for n in &nodes {
                let proxy = TcpProxy::start(n.port).await;
                let port = proxy.port.to_string();
                node_cmd(n.port, &["CONFIG", "SET", "cluster-announce-port", &port])
                    .await
                    .expect("CONFIG SET cluster-announce-port");
                proxies.push(proxy);
            }
        }
        let cluster = RedisCluster {
            nodes,
            dir,
            proxies,
        };
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = tokio::process::Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_healthy(3).await;
        cluster
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `REDIS_CLUSTER_URLS` for the gateway: every node as a seed (its
    /// proxy, when behind proxies).
    pub fn urls(&self) -> String {
        let ports = if self.proxies.is_empty() {
            self.ports()
        } else {
            self.proxies.iter().map(|p| p.port).collect()
        };
        ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Behind proxies: freeze every client connection open now (no byte
    /// moves, sockets stay open); new connections work.
    pub fn stall_clients(&self) {
        assert!(!self.proxies.is_empty(), "started behind proxies");
        for p in &self.proxies {
            p.stall();
        }
    }

    pub fn seeds(&self) -> Vec<String> {
        self.urls().split(',').map(String::from).collect()
    }

    fn alive_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The cluster as a live node sees it (ports are the nodes' own, also
    /// behind proxies).
    pub async fn topology(&self) -> Vec<NodeInfo> {
        for port in self.alive_ports() {
            if let Some(text) = node_text(port, &["CLUSTER", "NODES"]).await {
                let mut nodes = parse_nodes(&text);
                for n in &mut nodes {
                    if let Some(i) = self.proxies.iter().position(|p| p.port == n.port) {
                        n.port = self.nodes[i].port;
                    }
                }
                return nodes;
            }
        }
        panic!("no live cluster node answers CLUSTER NODES");
    }

    /// Wait until every live node reports `cluster_state:ok`, `primaries`
    /// primaries own all slots and every live primary has an in-sync replica
    /// (when one is still alive).
    pub async fn wait_healthy(&self, primaries: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.is_healthy(primaries).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cluster not healthy: {:?}",
                self.topology().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn is_healthy(&self, primaries: usize) -> bool {
        for port in self.alive_ports() {
            match node_text(port, &["CLUSTER", "INFO"]).await {
                Some(info) if info.contains("cluster_state:ok") => {}
                _ => return false,
            }
        }
        let topo = self.topology().await;
        let live: Vec<&NodeInfo> = topo
            .iter()
            .filter(|n| !n.failed && self.alive_ports().contains(&n.port))
            .collect();
        let owners = live
            .iter()
            .filter(|n| n.primary && !n.slots.is_empty())
            .count();
        if owners != primaries {
            return false;
        }
        // Replicas of live primaries must have their link up.
        for n in live.iter().filter(|n| !n.primary) {
            match node_text(n.port, &["INFO", "replication"]).await {
                Some(info) if info.contains("master_link_status:up") => {}
                _ => return false,
            }
        }
        true
    }

    /// The node serving `slot` now.
    pub async fn owner_of(&self, slot: u16) -> NodeInfo {
        self.topology()
            .await
            .into_iter()
            .find(|n| {
                n.primary && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .expect("every slot has an owner")
    }

    /// SIGKILL the primary that owns `slot`; returns its port.
    pub async fn kill_owner_of(&mut self, slot: u16) -> u16 {
        let owner = self.owner_of(slot).await;
        self.kill(owner.port);
        owner.port
    }

    pub fn kill(&mut self, port: u16) {
        for n in &mut self.nodes {
            if n.port == port {
                n.kill();
            }
        }
    }

    /// Wait until a primary other than `old_port` serves `slot`.
    pub async fn wait_failover(&self, slot: u16, old_port: u16) -> NodeInfo {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let topo = self.topology().await;
            if let Some(n) = topo.iter().find(|n| {
                n.primary
                    && !n.failed
                    && n.port != old_port
                    && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            }) {
                let ok = node_text(n.port, &["CLUSTER", "INFO"])
                    .await
                    .is_some_and(|i| i.contains("cluster_state:ok"));
                if ok {
                    return n.clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failover of slot {slot}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Move one slot, with its keys, to the primary listening on `to_port`
    /// (the steps `redis-cli --cluster reshard` takes for each slot).
    pub async fn move_slot(&self, slot: u16, to_port: u16) {
        let topo = self.topology().await;
        let from = self.owner_of(slot).await;
        let to = topo
            .iter()
            .find(|n| n.port == to_port && n.primary)
            .expect("target is a primary")
            .clone();
        if from.id == to.id {
            return;
        }
        let s = slot.to_string();
        let ok = |r: redis::RedisResult<redis::Value>| r.expect("slot migration step");
        ok(node_cmd(to.port, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from.id]).await);
        ok(node_cmd(from.port, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to.id]).await);
        loop {
            let keys: Vec<String> = redis::from_redis_value(ok(node_cmd(
                from.port,
                &["CLUSTER", "GETKEYSINSLOT", &s, "100"],
            )
            .await))
            .unwrap();
            if keys.is_empty() {
                break;
            }
            let port = to.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            ok(node_cmd(from.port, &args).await);
        }
        // Tell every primary (as redis-cli does), the target first.
        let mut primaries: Vec<&NodeInfo> = topo.iter().filter(|n| n.primary).collect();
        primaries.sort_by_key(|n| (n.id != to.id, n.id != from.id));
        for n in primaries {
            let _ = node_cmd(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.id]).await;
        }
        // Wait until every live node agrees.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.owner_of(slot).await.id == to.id {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot move not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Move `count` slots from the primary on `from_port` to the one on
    /// `to_port` with `redis-cli --cluster reshard`.
    pub async fn reshard(&self, from_port: u16, to_port: u16, count: u32) {
        let topo = self.topology().await;
        let id = |p: u16| topo.iter().find(|n| n.port == p).unwrap().id.clone();
        let out = tokio::process::Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{to_port}"),
                "--cluster-from",
                &id(from_port),
                "--cluster-to",
                &id(to_port),
                "--cluster-slots",
                &count.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "reshard failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
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

// ---------------------------------------------------------------- Sentinel

pub const SENTINEL_MASTER: &str = "ogmaster";

/// One master, one replica, three sentinels (quorum 2).
pub struct RedisSentinel {
    /// Data nodes by port.
    data: HashMap<u16, Proc>,
    sentinels: Vec<Proc>,
    dir: PathBuf,
}

impl RedisSentinel {
    pub async fn start() -> RedisSentinel {
        let dir = scratch_dir("sentinel");
        let data_args = |port: u16| -> Vec<String> {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--dir",
                &dir.to_string_lossy(),
                "--dbfilename",
                &format!("dump-{port}.rdb"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
        let master_proc = spawn_on_free_ports(|p, _| data_args(p)).await;
        let master = master_proc.port;
        let replica_proc = spawn_on_free_ports(|p, _| {
            let mut args = data_args(p);
            args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
            args
        })
        .await;
        let mut data = HashMap::new();
        data.insert(master, master_proc);
        data.insert(replica_proc.port, replica_proc);
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let sentinel_args = |port: u16, _| -> Vec<String> {
                let conf = dir.join(format!("sentinel-{port}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                         sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                         sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                         sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                        dir.to_string_lossy()
                    ),
                )
                .unwrap();
                vec![conf.to_string_lossy().to_string(), "--sentinel".into()]
            };
            sentinels.push(spawn_on_free_ports(sentinel_args).await);
        }
        let setup = RedisSentinel {
            data,
            sentinels,
            dir,
        };
        // Ready when the replica is in sync and every sentinel knows the
        // replica and the other sentinels (a failover needs both).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if setup.ready(master).await {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sentinel setup not ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        setup
    }

    async fn ready(&self, master: u16) -> bool {
        for p in self.data.keys().filter(|&&p| p != master) {
            match node_text(*p, &["INFO", "replication"]).await {
                Some(i) if i.contains("master_link_status:up") => {}
                _ => return false,
            }
        }
        for s in &self.sentinels {
            let Ok(v) = node_cmd(s.port, &["SENTINEL", "MASTER", SENTINEL_MASTER]).await else {
                return false;
            };
            let fields: Vec<String> = redis::from_redis_value(v).unwrap_or_default();
            let get = |k: &str| {
                fields
                    .iter()
                    .position(|f| f == k)
                    .and_then(|i| fields.get(i + 1))
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            if get("num-slaves") < 1 || get("num-other-sentinels") < 2 {
                return false;
            }
        }
        true
    }

    /// `REDIS_SENTINEL_URLS` for the gateway.
    pub fn urls(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master's port as the sentinels currently name it.
    pub async fn master_port(&self) -> u16 {
        for s in self.sentinels.iter().filter(|s| s.child.is_some()) {
            if let Ok(v) = node_cmd(
                s.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER],
            )
            .await
                && let Ok((_, port)) = redis::from_redis_value::<(String, u16)>(v)
            {
                return port;
            }
        }
        panic!("no sentinel names a master");
    }

    /// SIGKILL the current master; returns its port.
    pub async fn kill_master(&mut self) -> u16 {
        let port = self.master_port().await;
        if let Some(p) = self.data.get_mut(&port) {
            p.kill();
        }
        port
    }

    /// Wait until the sentinels name a master other than `old` and it
    /// answers as a master.
    pub async fn wait_failover(&self, old: u16) -> u16 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let port = self.master_port().await;
            if port != old
                && node_text(port, &["INFO", "replication"])
                    .await
                    .is_some_and(|i| i.contains("role:master"))
            {
                return port;
            }
            assert!(tokio::time::Instant::now() < deadline, "no failover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Port of a data node by role.
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.keys().copied().collect()
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.sentinels.clear();
        self.data.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- harness self-test

#[tokio::test]
async fn harness_cluster_starts_and_fails_over() {
    let mut cluster = RedisCluster::start().await;
    let slot = key_slot("orders:x");
    assert_eq!(key_slot("og:{orders:x}:meta"), slot);
    let v = node_cmd(
        cluster.ports()[0],
        &["CLUSTER", "KEYSLOT", "og:{orders:x}:meta"],
    )
    .await
    .unwrap();
    assert_eq!(redis::from_redis_value::<u16>(v).unwrap(), slot);
    let old = cluster.kill_owner_of(slot).await;
    let new = cluster.wait_failover(slot, old).await;
    assert_ne!(new.port, old);
}

#[tokio::test]
async fn harness_sentinel_starts_and_fails_over() {
    let mut s = RedisSentinel::start().await;
    let old = s.kill_master().await;
    let new = s.wait_failover(old).await;
    assert_ne!(new, old);
}
