//! The seeded fault injector: one fault at a time, one every few seconds.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;

use crate::Clock;
use crate::infra::{Postgres, Redis, Replica, ReplicaSpec};

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
        }
    }

    pub fn all() -> Vec<Kind> {
        use clap::ValueEnum;
        Kind::value_variants().to_vec()
    }
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
    pub redis: Redis,
    pub postgres: Postgres,
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
                if self.clock.t() >= next_save {
                    // The point a rollback returns to.
                    let _ = self.redis.cmd(&["BGSAVE"]).await;
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
                self.redis.restart_clean().await?;
                Ok("data kept".into())
            }
            Kind::RedisRollback => {
                self.redis.restart_rolled_back().await?;
                Ok("back to the last BGSAVE (≤ 5 s old)".into())
            }
            Kind::RedisWipe => {
                self.redis.restart_empty().await?;
                Ok("all data lost".into())
            }
            Kind::ProxyPartition => {
                let (i, _) = self.pick(false).await;
                let ms = self.rng.random_range(2000..8000);
                let drop_stalled = self.rng.random_bool(0.5);
                let proxy = self.replicas[i].proxy.clone();
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
                let n = self.replicas[i].proxy.deafen_pubsub();
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
        }
    }

    /// End of the fault phase: everything running and connected again
    /// (deaf links stay deaf: finding them is the gateway's job).
    pub async fn heal_all(&mut self) {
        for r in &self.replicas {
            r.send("CONT");
            r.proxy.heal(false);
        }
        self.watch_crashes().await;
    }
}
