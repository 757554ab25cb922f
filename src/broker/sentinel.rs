//! Where the Redis master is: a fixed `REDIS_URL`, or whatever Redis
//! Sentinel names now (`REDIS_SENTINEL_URLS` + `REDIS_SENTINEL_MASTER`).
//!
//! With Sentinel, [`Master`] asks the sentinels for the master's address,
//! checks with `ROLE` that the named server really is a master before any
//! command goes to it, and keeps one connection pool for that address. It
//! asks again every [`RECHECK`] and whenever a command failed in a way a
//! failover explains (connection refused or lost, `READONLY` from a demoted
//! master), so writes follow a failover within about a second and never keep
//! going to a demoted master. Every switch bumps a generation the pub/sub
//! receiver watches: it reconnects to the new master and reports
//! `Inbound::Resubscribed` so the node gap-fills from history.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::BrokerError;
use crate::tasks::Supervisor;

/// How often the sentinels are asked even when nothing failed.
const RECHECK: Duration = Duration::from_secs(1);
/// One sentinel or ROLE round trip.
const ASK_TIMEOUT: Duration = Duration::from_millis(1000);
/// Re-resolutions triggered by failing commands are at most this frequent.
const MIN_RESOLVE_GAP: Duration = Duration::from_millis(200);

/// The connection pool of one master address.
pub struct Endpoint {
    pub url: String,
    pub pool: Pool,
}

/// The master commands go to, and how to find it again.
pub struct Master {
    /// `None` until a sentinel has named a master. Std mutex: held only to
    /// clone or replace the `Arc`.
    current: Mutex<Option<Arc<Endpoint>>>,
    sentinel: Option<Sentinels>,
    /// Bumped on every switch of master; the receiver reconnects on change.
    generation: watch::Sender<u64>,
    /// Serializes re-resolutions (never held across a command to Redis by
    /// callers; only the resolver awaits under it).
    resolving: tokio::sync::Mutex<tokio::time::Instant>,
    command_timeout: Duration,
}

/// Sentinel addresses and the monitored master's name.
#[derive(Clone, Debug)]
pub struct Sentinels {
    pub urls: Vec<String>,
    pub master: String,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

pub fn pool_for(url: &str, command_timeout: Duration) -> Result<Pool, BrokerError> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    cfg.pool = Some(PoolConfig {
        max_size: 32,
        timeouts: Timeouts {
            wait: Some(command_timeout),
            create: Some(command_timeout),
            recycle: Some(command_timeout),
        },
        ..PoolConfig::default()
    });
    cfg.create_pool(Some(Runtime::Tokio1)).map_err(unavailable)
}

impl Master {
    /// A fixed address (`REDIS_URL`).
    pub fn fixed(url: &str, command_timeout: Duration) -> Result<Master, BrokerError> {
        Ok(Master::new(
            Some(Endpoint {
                url: url.to_string(),
                pool: pool_for(url, command_timeout)?,
            }),
            None,
            command_timeout,
        ))
    }

    /// Found through Sentinel. Works even when no sentinel answers yet:
    /// commands fail as unavailable until one does.
    pub async fn sentinel(
        sentinels: Sentinels,
        command_timeout: Duration,
        shutdown: CancellationToken,
        tasks: &Supervisor,
    ) -> Result<Arc<Master>, BrokerError> {
        for u in &sentinels.urls {
            redis::Client::open(u.as_str()).map_err(unavailable)?;
        }
        let master = Arc::new(Master::new(None, Some(sentinels), command_timeout));
        if let Err(e) = master.resolve(true).await {
            tracing::warn!(error = %e, "Redis Sentinel: no master yet; will keep asking");
        }
        tasks.spawn(
            "sentinel_recheck",
            recheck(Arc::downgrade(&master), shutdown),
        );
        Ok(master)
    }

    fn new(
        endpoint: Option<Endpoint>,
        sentinel: Option<Sentinels>,
        command_timeout: Duration,
    ) -> Master {
        Master {
            current: Mutex::new(endpoint.map(Arc::new)),
            sentinel,
            generation: watch::channel(0).0,
            resolving: tokio::sync::Mutex::new(tokio::time::Instant::now() - MIN_RESOLVE_GAP * 2),
            command_timeout,
        }
    }

    /// The master to talk to now; asks the sentinels first when none is
    /// known yet.
    pub async fn endpoint(&self) -> Result<Arc<Endpoint>, BrokerError> {
        if let Some(ep) = self.known() {
            return Ok(ep);
        }
        self.suspect().await;
        self.known()
            .ok_or_else(|| unavailable("no Redis master known yet (Sentinel)"))
    }

    fn known(&self) -> Option<Arc<Endpoint>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes whenever the master changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn follows_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// A command failed in a way a failover explains: look again (no-op
    /// without Sentinel, rate-limited with it).
    pub async fn suspect(&self) {
        if self.sentinel.is_some()
            && let Err(e) = self.resolve(false).await
        {
            tracing::debug!(error = %e, "Redis Sentinel: re-resolution failed");
        }
    }

    /// Ask the sentinels; switch when they name another address that
    /// answers `ROLE` as master.
    async fn resolve(&self, force: bool) -> Result<(), BrokerError> {
        let Some(s) = &self.sentinel else {
            return Ok(());
        };
        let mut last = self.resolving.lock().await;
        if !force && last.elapsed() < MIN_RESOLVE_GAP {
            return Ok(());
        }
        *last = tokio::time::Instant::now();
        let (host, port) = ask_sentinels(s).await?;
        let url = data_url(&s.urls[0], &host, port);
        if self.known().is_some_and(|ep| ep.url == url) {
            return Ok(());
        }
        // Never switch to a server that is not (yet, or any more) a master:
        // right after a failover the sentinels may name a replica that has
        // not finished its promotion.
        let role = role_of(&url).await?;
        if role != "master" {
            return Err(unavailable(format!(
                "sentinel names {host}:{port} but it answers ROLE {role}"
            )));
        }
        let endpoint = Arc::new(Endpoint {
            pool: pool_for(&url, self.command_timeout)?,
            url: url.clone(),
        });
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(endpoint);
        self.generation.send_modify(|g| *g += 1);
        metrics::counter!("orders_gateway_redis_master_switches_total").increment(1);
        tracing::warn!(master = %format!("{host}:{port}"), "Redis Sentinel: now using this master");
        Ok(())
    }

    /// Is the current endpoint still a master? Used by the receiver before
    /// it trusts a (re)connection.
    pub async fn verify(&self) -> Result<Arc<Endpoint>, BrokerError> {
        let ep = self.endpoint().await?;
        if self.sentinel.is_none() {
            return Ok(ep);
        }
        match role_of(&ep.url).await {
            Ok(role) if role == "master" => Ok(ep),
            Ok(role) => {
                self.suspect().await;
                Err(unavailable(format!(
                    "{} is a {role}, not the master",
                    ep.url
                )))
            }
            Err(e) => {
                self.suspect().await;
                Err(e)
            }
        }
    }
}

/// Background: ask the sentinels every [`RECHECK`], so a failover is
/// followed even by a replica that sends no commands.
async fn recheck(master: std::sync::Weak<Master>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RECHECK) => {}
        }
        let Some(m) = master.upgrade() else { return };
        if let Err(e) = m.resolve(true).await {
            tracing::debug!(error = %e, "Redis Sentinel: periodic check failed");
        }
    }
}

async fn ask_sentinels(s: &Sentinels) -> Result<(String, u16), BrokerError> {
    let mut last_err = None;
    for url in &s.urls {
        let ask = async {
            let client = redis::Client::open(url.as_str())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&s.master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        match tokio::time::timeout(ASK_TIMEOUT, ask).await {
            Ok(Ok(Some(addr))) => return Ok(addr),
            Ok(Ok(None)) => {
                last_err = Some(format!("sentinel {url} does not know {}", s.master));
            }
            Ok(Err(e)) => last_err = Some(format!("sentinel {url}: {e}")),
            Err(_) => last_err = Some(format!("sentinel {url}: timed out")),
        }
    }
    Err(unavailable(
        last_err.unwrap_or_else(|| "no sentinel configured".into()),
    ))
}

async fn role_of(url: &str) -> Result<String, BrokerError> {
    let ask = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let v: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await?;
        let first = match v {
            redis::Value::Array(items) => items.into_iter().next(),
            _ => None,
        };
        Ok::<String, redis::RedisError>(
            first
                .and_then(|f| redis::from_redis_value::<String>(f).ok())
                .unwrap_or_default(),
        )
    };
    match tokio::time::timeout(ASK_TIMEOUT, ask).await {
        Ok(Ok(role)) => Ok(role),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(unavailable("ROLE timed out")),
    }
}

/// The data node's URL: the sentinel URL's scheme, credentials and database
/// with the master's host and port (deployments commonly share one password
/// between sentinels and data nodes; see docs/OPERATIONS.md).
fn data_url(sentinel_url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = sentinel_url
        .split_once("://")
        .unwrap_or(("redis", sentinel_url));
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), rest),
    };
    let path = hostpart.find('/').map(|i| &hostpart[i..]).unwrap_or("/");
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{scheme}://{userinfo}{host}:{port}{path}")
}

#[cfg(test)]
mod tests {
    use super::data_url;

    #[test]
    fn data_url_keeps_scheme_credentials_and_path() {
        assert_eq!(
            data_url("redis://127.0.0.1:26379", "10.0.0.5", 6380),
            "redis://10.0.0.5:6380/"
        );
        assert_eq!(
            data_url("rediss://user:pw@sentinel:26379/2", "10.0.0.5", 6380),
            "rediss://user:pw@10.0.0.5:6380/2"
        );
        assert_eq!(data_url("redis://s:1", "::1", 7000), "redis://[::1]:7000/");
    }
}
