//! The seeded fault injector: one fault at a time, one every few seconds.

use std::time::Duration;

use anyhow::bail;
use orders_gateway::broker::cluster::key_slot;
use orders_gateway::domain::RestaurantId;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;
use uuid::Uuid;

use crate::Clock;
use crate::infra::{CLUSTER_PRIMARIES, Postgres, Redis, RedisCluster, Replica, ReplicaSpec};

/// How long a cluster fault may wait for a promotion, a failover or the
/// cluster to be whole again before it counts as an injection error.
const CLUSTER_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Kind {
    /// SIGKILL a random replica, start it again.
    KillReplica,
    /// SIGKILL the poller leader, start it again.
    KillLeader,
    /// SIGTERM a random replica (drain), start it again.
    TermReplica,
    /// SIGSTOP the poller leader past its lock TTL, then SIGCONT (fencing).
    StopLeader,
    /// SHUTDOWN SAVE Redis and start it again: data kept, links broken.
    RedisRestart,
    /// SIGKILL Redis, start it from the last periodic BGSAVE: recent
    /// writes lost (an async replica promoted, a restore).
    RedisRollback,
    /// SIGKILL Redis, start it empty.
    RedisWipe,
    /// One replica's proxy to Redis stops moving bytes (sockets stay open)
    /// for a few seconds; then the stalled connections resume or are dropped.
    ProxyPartition,
    /// One replica's pub/sub connection stops delivering for good, while
    /// its commands still work (a deaf subscription link).
    ProxyDeaf,
    /// Restart PostgreSQL (only with a cluster of the soak's own).
    PgRestart,
    /// Every dashboard of one restaurant goes away for longer than the
    /// presence TTL, then resumes with its cursor.
    DashboardsAway,
    /// Redis Cluster: SIGKILL a random primary, wait for its replica to be
    /// promoted, start the killed node again (it rejoins as a replica).
    ClusterKillPrimary,
    /// Redis Cluster: `CLUSTER FAILOVER` on a random replica (graceful).
    ClusterFailover,
    /// Redis Cluster: move a restaurant's channel slot and a few more from
    /// its primary to another one.
    ClusterReshard,
}

/// Which Redis the soak runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// One redis-server behind a proxy per replica (`REDIS_URL`).
    Single,
    /// A Redis Cluster of 3 primaries + 3 replicas (`REDIS_CLUSTER_URLS`).
    Cluster,
}

impl RedisMode {
    pub fn name(self) -> &'static str {
        match self {
            RedisMode::Single => "single",
            RedisMode::Cluster => "cluster",
        }
    }
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillReplica => "kill-replica",
            Kind::KillLeader => "kill-leader",
            Kind::TermReplica => "term-replica",
            Kind::StopLeader => "stop-leader",
            Kind::RedisRestart => "redis-restart",
            Kind::RedisRollback => "redis-rollback",
            Kind::RedisWipe => "redis-wipe",
            Kind::ProxyPartition => "proxy-partition",
            Kind::ProxyDeaf => "proxy-deaf",
            Kind::PgRestart => "pg-restart",
            Kind::DashboardsAway => "dashboards-away",
            Kind::ClusterKillPrimary => "cluster-kill-primary",
            Kind::ClusterFailover => "cluster-failover",
            Kind::ClusterReshard => "cluster-reshard",
        }
    }

    /// Faults that need the single redis-server and its proxies.
    pub fn single_only(self) -> bool {
        matches!(
            self,
            Kind::RedisRestart
                | Kind::RedisRollback
                | Kind::RedisWipe
                | Kind::ProxyPartition
                | Kind::ProxyDeaf
        )
    }

    /// Faults that need the Redis Cluster.
    pub fn cluster_only(self) -> bool {
        matches!(
            self,
            Kind::ClusterKillPrimary | Kind::ClusterFailover | Kind::ClusterReshard
        )
    }

    /// Every kind the mode can inject, in declaration order (the seed picks
    /// by index: single mode keeps the list it always had).
    pub fn all(mode: RedisMode) -> Vec<Kind> {
        use clap::ValueEnum;
        Kind::value_variants()
            .iter()
            .copied()
            .filter(|k| match mode {
                RedisMode::Single => !k.cluster_only(),
                RedisMode::Cluster => !k.single_only(),
            })
            .collect()
    }
}

/// The Redis the injector breaks.
pub enum Backend {
    Single(Redis),
    Cluster(RedisCluster),
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub n: usize,
    pub t: f64,
    pub end_t: f64,
    pub kind: Kind,
    pub detail: String,
}

/// A replica that exited on its own (not by a fault): a crash.
#[derive(Clone, Debug)]
pub struct Crash {
    pub t: f64,
    pub slot: usize,
    pub instance: String,
}

pub struct Injector {
    pub clock: Clock,
    pub rng: StdRng,
    pub kinds: Vec<Kind>,
    pub every: f64,
    pub replicas: Vec<Replica>,
    pub spec: ReplicaSpec,
    pub redis: Backend,
    pub postgres: Postgres,
    /// The restaurants, to pick a channel slot to reshard.
    pub restaurants: Vec<Uuid>,
    pub away: Vec<watch::Sender<f64>>,
    pub presence_ttl: Duration,
    pub leader_ttl: Duration,
    pub status_token: String,
    pub http: reqwest::Client,
    pub faults: Vec<Fault>,
    pub crashes: Vec<Crash>,
    pub errors: Vec<String>,
    /// Stretches (from, to) with no poller leader named by any replica.
    pub leaderless: Vec<(f64, f64)>,
    pub leaderless_since: Option<f64>,
    pub next_leader_check: f64,
}

impl Injector {
    pub fn new_rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    /// Inject faults until `until` (seconds on the clock).
    pub async fn run(&mut self, until: f64) {
        let mut next_save = self.clock.t() + 5.0;
        while self.clock.t() < until {
            let gap = self.every * self.rng.random_range(0.5..1.5);
            let wake = (self.clock.t() + gap).min(until);
            while self.clock.t() < wake {
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.watch_crashes().await;
                self.watch_leader().await;
                if self.clock.t() >= next_save
                    && let Backend::Single(redis) = &self.redis
                {
                    // The point a rollback returns to.
                    let _ = redis.cmd(&["BGSAVE"]).await;
                    next_save = self.clock.t() + 5.0;
                }
            }
            if self.clock.t() >= until || self.kinds.is_empty() {
                break;
            }
            let kind = self.kinds[self.rng.random_range(0..self.kinds.len())];
            let t = self.clock.t();
            let detail = match self.inject(kind).await {
                Ok(d) => d,
                Err(e) => {
                    self.errors
                        .push(format!("t={t:.1}s {}: {e:#}", kind.name()));
                    format!("failed: {e:#}")
                }
            };
            let n = self.faults.len() + 1;
            let end_t = self.clock.t();
            println!("[soak] t={t:7.1}s fault #{n} {} {detail}", kind.name());
            self.faults.push(Fault {
                n,
                t,
                end_t,
                kind,
                detail,
            });
        }
    }

    /// Replicas that died without a fault are crashes: record, restart.
    pub async fn watch_crashes(&mut self) {
        for i in 0..self.replicas.len() {
            if !self.replicas[i].is_running() {
                let r = &mut self.replicas[i];
                println!(
                    "[soak] t={:7.1}s CRASH replica {} ({}) exited on its own",
                    self.clock.t(),
                    r.slot,
                    r.instance_id
                );
                self.crashes.push(Crash {
                    t: self.clock.t(),
                    slot: r.slot,
                    instance: r.instance_id.clone(),
                });
                r.kill();
                if let Err(e) = r.spawn(&self.spec).await {
                    self.errors.push(format!("restart after crash: {e:#}"));
                }
            }
        }
    }

    /// Once a second: does any replica name a poller leader? (Without one,
    /// nothing committed in the database reaches anybody.)
    pub async fn watch_leader(&mut self) {
        let now = self.clock.t();
        if now < self.next_leader_check {
            return;
        }
        self.next_leader_check = now + 1.0;
        let has = self.leader().await.is_some();
        match (has, self.leaderless_since) {
            (false, None) => self.leaderless_since = Some(now),
            (true, Some(from)) => {
                self.leaderless_since = None;
                if now - from > 3.0 {
                    println!(
                        "[soak] t={now:7.1}s no poller leader from t={from:.1}s ({:.1} s)",
                        now - from
                    );
                    self.leaderless.push((from, now));
                }
            }
            _ => {}
        }
    }

    /// End of the run: close an open leaderless stretch.
    pub fn leaderless_until(&mut self, now: f64) {
        if let Some(from) = self.leaderless_since.take()
            && now - from > 3.0
        {
            self.leaderless.push((from, now));
        }
    }

    /// The slot of the poller leader, from any replica's status endpoint.
    async fn leader(&mut self) -> Option<usize> {
        for r in &self.replicas {
            let Ok(resp) = self
                .http
                .get(format!("http://{}/api/ws/orders/live/status", r.addr))
                .bearer_auth(&self.status_token)
                .timeout(Duration::from_secs(1))
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = resp.json::<Value>().await else {
                continue;
            };
            if let Some(id) = v["realtime"]["poller_leader"].as_str() {
                return self.replicas.iter().position(|r| r.instance_id == id);
            }
        }
        None
    }

    async fn pick(&mut self, leader: bool) -> (usize, &'static str) {
        if leader && let Some(i) = self.leader().await {
            return (i, "leader");
        }
        let i = self.rng.random_range(0..self.replicas.len());
        (
            i,
            if leader {
                "no leader found, random"
            } else {
                ""
            },
        )
    }

    async fn restart(&mut self, i: usize) -> anyhow::Result<String> {
        let pause = self.rng.random_range(300..2000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let old = self.replicas[i].instance_id.clone();
        self.replicas[i].spawn(&self.spec).await?;
        Ok(format!(
            "r{i} {old} -> {} after {pause} ms",
            self.replicas[i].instance_id
        ))
    }

    async fn inject(&mut self, kind: Kind) -> anyhow::Result<String> {
        match kind {
            Kind::KillReplica | Kind::KillLeader => {
                let (i, how) = self.pick(kind == Kind::KillLeader).await;
                self.replicas[i].kill();
                Ok(format!("{how} {}", self.restart(i).await?))
            }
            Kind::TermReplica => {
                let (i, _) = self.pick(false).await;
                let code = self.replicas[i].terminate(Duration::from_secs(10)).await;
                let r = self.restart(i).await?;
                Ok(format!("exit {code:?}; {r}"))
            }
            Kind::StopLeader => {
                let (i, how) = self.pick(true).await;
                let ms = self.leader_ttl.as_millis() as u64 + self.rng.random_range(500..2500);
                self.replicas[i].send("STOP");
                tokio::time::sleep(Duration::from_millis(ms)).await;
                self.replicas[i].send("CONT");
                Ok(format!(
                    "{how} r{i} {} stopped {ms} ms",
                    self.replicas[i].instance_id
                ))
            }
            Kind::RedisRestart => {
                self.single()?.restart_clean().await?;
                Ok("data kept".into())
            }
            Kind::RedisRollback => {
                self.single()?.restart_rolled_back().await?;
                Ok("back to the last BGSAVE (≤ 5 s old)".into())
            }
            Kind::RedisWipe => {
                self.single()?.restart_empty().await?;
                Ok("all data lost".into())
            }
            Kind::ProxyPartition => {
                let (i, _) = self.pick(false).await;
                let ms = self.rng.random_range(2000..8000);
                let drop_stalled = self.rng.random_bool(0.5);
                let Some(proxy) = self.replicas[i].proxy.clone() else {
                    bail!("no proxy in front of Redis (single mode only)");
                };
                proxy.partition();
                tokio::time::sleep(Duration::from_millis(ms)).await;
                proxy.heal(drop_stalled);
                Ok(format!(
                    "r{i} {} for {ms} ms, then {}",
                    self.replicas[i].instance_id,
                    if drop_stalled {
                        "stalled connections dropped"
                    } else {
                        "stalled bytes flow again"
                    }
                ))
            }
            Kind::ProxyDeaf => {
                let (i, _) = self.pick(false).await;
                let Some(proxy) = &self.replicas[i].proxy else {
                    bail!("no proxy in front of Redis (single mode only)");
                };
                let n = proxy.deafen_pubsub();
                Ok(format!(
                    "r{i} {}: {n} pub/sub connection(s) deaf for good",
                    self.replicas[i].instance_id
                ))
            }
            Kind::PgRestart => {
                let Some(cluster) = self.postgres.own_cluster() else {
                    anyhow::bail!("not our PostgreSQL (use --own-postgres)");
                };
                let mode = if self.rng.random_bool(0.5) {
                    "fast"
                } else {
                    "immediate"
                };
                // pg_ctl waits for the server: keep it off the async workers.
                tokio::task::block_in_place(|| cluster.pg_ctl(&["-m", mode, "restart"]))?;
                Ok(format!("-m {mode}"))
            }
            Kind::DashboardsAway => {
                let r = self.rng.random_range(0..self.away.len());
                let secs = self.presence_ttl.as_secs_f64() + self.rng.random_range(1.0..3.0);
                self.away[r].send_replace(self.clock.t() + secs);
                Ok(format!("restaurant {r} away {secs:.1} s"))
            }
            Kind::ClusterKillPrimary | Kind::ClusterFailover | Kind::ClusterReshard => {
                // A fault starts from a whole cluster (an earlier one may
                // have timed out waiting for it).
                if let Backend::Cluster(cluster) = &mut self.redis {
                    cluster.wait_healthy(CLUSTER_WAIT).await?;
                }
                match kind {
                    Kind::ClusterKillPrimary => self.cluster_kill_primary().await,
                    Kind::ClusterFailover => self.cluster_failover().await,
                    _ => self.cluster_reshard().await,
                }
            }
        }
    }

    fn single(&mut self) -> anyhow::Result<&mut Redis> {
        match &mut self.redis {
            Backend::Single(r) => Ok(r),
            Backend::Cluster(_) => bail!("a single-node fault (not with --redis cluster)"),
        }
    }

    /// SIGKILL a primary, wait for the promotion, start the node again after
    /// a pause and wait until it has rejoined as a replica in sync: the
    /// cluster is back to 3 primaries + 3 replicas before the next fault.
    async fn cluster_kill_primary(&mut self) -> anyhow::Result<String> {
        let Backend::Cluster(cluster) = &mut self.redis else {
            bail!("a cluster fault (needs --redis cluster)");
        };
        let primaries = cluster.primaries().await?;
        if primaries.is_empty() {
            bail!("no live primary");
        }
        let victim = primaries[self.rng.random_range(0..primaries.len())].clone();
        let pause = self.rng.random_range(300..2000);
        let slot = victim.slots[0].0;
        let t0 = self.clock.t();
        cluster.kill(victim.port);
        let promoted = cluster.wait_promoted(slot, &victim.id, CLUSTER_WAIT).await;
        let took = self.clock.t() - t0;
        // Started again even when no promotion came (then it takes its
        // slots back itself).
        tokio::time::sleep(Duration::from_millis(pause)).await;
        cluster.restart(victim.port).await?;
        let promoted = promoted?;
        let t1 = self.clock.t();
        cluster.wait_healthy(CLUSTER_WAIT).await?;
        Ok(format!(
            "primary :{} ({} slots) SIGKILLed; replica :{} promoted after {took:.1} s; \
             restarted after {pause} ms, in sync as a replica {:.1} s later",
            victim.port,
            victim.slot_count(),
            promoted.port,
            self.clock.t() - t1
        ))
    }

    /// `CLUSTER FAILOVER` on a random replica; waits until the cluster is
    /// whole again (the old primary follows as a replica).
    async fn cluster_failover(&mut self) -> anyhow::Result<String> {
        let Backend::Cluster(cluster) = &mut self.redis else {
            bail!("a cluster fault (needs --redis cluster)");
        };
        let replicas = cluster.replicas().await?;
        if replicas.is_empty() {
            bail!("no live replica");
        }
        let node = replicas[self.rng.random_range(0..replicas.len())].clone();
        let t0 = self.clock.t();
        cluster.failover(node.port, CLUSTER_WAIT).await?;
        let took = self.clock.t() - t0;
        cluster.wait_healthy(CLUSTER_WAIT).await?;
        let slots = cluster
            .primaries()
            .await?
            .into_iter()
            .find(|n| n.id == node.id)
            .map(|n| n.slot_count())
            .unwrap_or(0);
        Ok(format!(
            "replica :{} took over {slots} slots after {took:.1} s",
            node.port
        ))
    }

    /// Move the channel slot of a random restaurant (with its history,
    /// numbering and dedup keys, all tagged `{orders:<rid>}`) to another
    /// primary by the SETSLOT/MIGRATE steps, then a few more slots of the
    /// same primary with `redis-cli --cluster reshard`.
    async fn cluster_reshard(&mut self) -> anyhow::Result<String> {
        let Backend::Cluster(cluster) = &mut self.redis else {
            bail!("a cluster fault (needs --redis cluster)");
        };
        if self.restaurants.is_empty() {
            bail!("no restaurant");
        }
        let ri = self.rng.random_range(0..self.restaurants.len());
        let slot = key_slot(&RestaurantId(self.restaurants[ri]).channel());
        let more = self.rng.random_range(2..=8u32);
        let to_pick = self.rng.random_range(0..CLUSTER_PRIMARIES - 1);
        let primaries = cluster.primaries().await?;
        let Some(from) = primaries.iter().find(|n| n.owns(slot)).cloned() else {
            bail!("no primary owns slot {slot}");
        };
        let others: Vec<_> = primaries.iter().filter(|n| n.id != from.id).collect();
        if others.is_empty() {
            bail!("no other primary");
        }
        let to = others[to_pick % others.len()].clone();
        let keys = cluster.move_slot(slot, &from, &to).await?;
        cluster.wait_healthy(CLUSTER_WAIT).await?;
        cluster.reshard(&from, &to, more).await?;
        cluster.wait_healthy(CLUSTER_WAIT).await?;
        Ok(format!(
            "slot {slot} (restaurant {ri}, {keys} keys) and {more} more from :{} to :{}",
            from.port, to.port
        ))
    }

    /// End of the fault phase: everything running and connected again
    /// (deaf links stay deaf: finding them is the gateway's job).
    pub async fn heal_all(&mut self) {
        for r in &self.replicas {
            r.send("CONT");
            if let Some(p) = &r.proxy {
                p.heal(false);
            }
        }
        if let Backend::Cluster(cluster) = &mut self.redis
            && let Err(e) = cluster.heal().await
        {
            self.errors.push(format!("cluster heal: {e:#}"));
        }
        self.watch_crashes().await;
    }
}
