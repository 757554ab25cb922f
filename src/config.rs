//! One `Config`, read from the environment (each variable also a flag) and
//! validated before anything starts. A bad value stops the process with one
//! line naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "orders-gateway",
    version,
    about = "Real-time order notifications for restaurant dashboards"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply the bundled schema migrations to DATABASE_URL, then exit.
    Migrate,
}

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// HTTP + WebSocket listener.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:8080")]
    pub bind_addr: SocketAddr,
    /// Redis URL. Unset: embedded in-memory broker, single replica only.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Comma list of seed nodes of a Redis Cluster (`redis://host:port,…`).
    #[arg(long, env = "REDIS_CLUSTER_URLS")]
    pub redis_cluster_urls: Option<String>,
    /// Comma list of Sentinel addresses (`redis://host:port,…`).
    #[arg(long, env = "REDIS_SENTINEL_URLS")]
    pub redis_sentinel_urls: Option<String>,
    /// Name of the master the sentinels monitor (required with the list).
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,
    /// PostgreSQL URL. Unset: no poller, no snapshots, no membership lookup.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Direct connection the poller leader holds for `LISTEN orders_changed`
    /// (the wake-up, docs/CHANGE_CAPTURE.md). Default: DATABASE_URL. Set it
    /// when DATABASE_URL goes through a transaction-mode pooler (PgBouncer,
    /// Supavisor), which breaks LISTEN; `off` disables the wake-up.
    #[arg(long, env = "DATABASE_LISTEN_URL", hide_env_values = true)]
    pub database_listen_url: Option<String>,
    /// HS256 secret (Supabase legacy JWT secret).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// JWKS document URL for RS256/ES256 tokens.
    #[arg(long, env = "JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// The JWKS document is fetched again when the copy held is this old,
    /// so a key removed from it (rotated out, or compromised) stops
    /// verifying tokens within this bound.
    #[arg(long, env = "JWT_JWKS_MAX_AGE_SECS", default_value_t = 600)]
    pub jwt_jwks_max_age_secs: u64,
    /// Required `aud` when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Claim naming the restaurant.
    #[arg(long, env = "JWT_RESTAURANT_CLAIM", default_value = "restaurant_id")]
    pub jwt_restaurant_claim: String,
    /// Clock-skew allowance for exp/nbf.
    #[arg(long, env = "JWT_LEEWAY_SECONDS", default_value_t = 5)]
    pub jwt_leeway_seconds: u64,
    /// Comma-separated browser origins allowed to open sockets. Unset: any
    /// origin (tokens, not cookies, authenticate, so a foreign page cannot
    /// ride on a user's session; set it in production anyway).
    #[arg(long, env = "ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Poller period.
    #[arg(long, env = "POLL_INTERVAL_MS", default_value_t = 2000)]
    pub poll_interval_ms: u64,
    /// Replica name shown in status and logs. Default: generated.
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Enables POST /api/orders/events for order services.
    #[arg(long, env = "PUBLISH_API_KEY", hide_env_values = true)]
    pub publish_api_key: Option<String>,

    /// Sockets per replica; beyond it new sockets are closed with 4429.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Sockets per restaurant per replica; beyond it 4429.
    #[arg(long, env = "MAX_CONNECTIONS_PER_RESTAURANT", default_value_t = 1000)]
    pub max_connections_per_restaurant: usize,
    /// Server WebSocket ping period; peers silent for 2.5x are dropped.
    #[arg(long, env = "HEARTBEAT_INTERVAL_MS", default_value_t = 25_000)]
    pub heartbeat_interval_ms: u64,
    /// Frames queued per socket before it is closed with 4408.
    #[arg(long, env = "SEND_QUEUE_CAPACITY", default_value_t = 256)]
    pub send_queue_capacity: usize,
    /// Slowest delivery a message may take beyond the 10 s no-progress
    /// deadline: a message of N bytes (a snapshot, a catch-up replay as a
    /// whole) must be read within 10 s + N / this, or the socket closes
    /// with 4408. Bounds how long a client reading a trickle holds one.
    #[arg(long, env = "MIN_SEND_BYTES_PER_SEC", default_value_t = 16_384)]
    pub min_send_bytes_per_sec: u64,
    /// Client messages per second per socket (burst twice that); 4429 beyond.
    #[arg(long, env = "CLIENT_MESSAGE_RATE", default_value_t = 10)]
    pub client_message_rate: u32,
    /// Deadline for closing every socket with 1001 on SIGTERM.
    #[arg(long, env = "SHUTDOWN_DRAIN_MS", default_value_t = 10_000)]
    pub shutdown_drain_ms: u64,
    /// Poller leader lock TTL. Default: three poll intervals.
    #[arg(long, env = "LEADER_TTL_MS")]
    pub leader_ttl_ms: Option<u64>,
    /// Poller re-read window; see docs/CHANGE_CAPTURE.md.
    #[arg(long, env = "POLL_OVERLAP_MS", default_value_t = 10_000)]
    pub poll_overlap_ms: u64,
    /// Events kept per restaurant for resume.
    #[arg(long, env = "HISTORY_MAX_EVENTS", default_value_t = 1000)]
    pub history_max_events: u64,
    /// Oldest event kept for resume, in seconds.
    #[arg(long, env = "HISTORY_MAX_AGE_SECS", default_value_t = 3600)]
    pub history_max_age_secs: u64,
    /// How long a replica's registration outlives its last heartbeat.
    #[arg(long, env = "PRESENCE_TTL_MS", default_value_t = 20_000)]
    pub presence_ttl_ms: u64,
    /// How often open sockets admitted through `restaurant_members` are
    /// re-checked (one batched query per replica): a removed member's
    /// sockets close with 4403 within this period.
    #[arg(long, env = "MEMBERSHIP_RECHECK_MS", default_value_t = 30_000)]
    pub membership_recheck_ms: u64,
    /// A replica that has been without a working Redis link (commands or
    /// its pub/sub liveness probe) this long closes its sockets with 1013
    /// and refuses new ones until Redis is back, so that dashboards move to
    /// a replica that still delivers.
    #[arg(long, env = "REDIS_LOST_CLOSE_MS", default_value_t = 15_000)]
    pub redis_lost_close_ms: u64,
    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Demo mode: a demo restaurant, a generated token and simulated guests.
    #[arg(long, env = "DEMO", default_value_t = false)]
    pub demo: bool,
    /// A connection must send a whole request head within this (slowloris).
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// From accept to the WebSocket upgrade (or, for plain HTTP, to the
    /// end of the connection's last request); past it the connection is
    /// closed once its request in flight, if any, is answered.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_MS", default_value_t = 15_000)]
    pub handshake_timeout_ms: u64,
    /// Connections accepted but not yet upgraded (or plain HTTP); beyond it
    /// new connections are closed at once.
    #[arg(long, env = "MAX_HANDSHAKES", default_value_t = 1024)]
    pub max_handshakes: usize,
}

/// A configuration value that cannot work, named by its variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn bad(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        reason: reason.into(),
    }
}

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;

/// `min..=max` or an error naming the variable and the accepted range.
fn within(
    var: &'static str,
    value: u64,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(bad(
            var,
            format!("{value}{unit} is out of range: must be between {min}{unit} and {max}{unit}"),
        ))
    }
}

impl Config {
    /// A configuration with every default, for tests and embedding.
    pub fn for_tests(jwt_secret: &str) -> Config {
        let mut cfg = Cli::parse_from(["orders-gateway"]).config;
        cfg.bind_addr = "127.0.0.1:0".parse().unwrap();
        cfg.jwt_secret = Some(jwt_secret.to_string());
        cfg.instance_id = None;
        cfg
    }

    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.demo && self.jwt_secret.is_none() && self.jwt_jwks_url.is_none() {
            self.jwt_secret = Some(Uuid::new_v4().simple().to_string());
        }
        match (&self.jwt_secret, &self.jwt_jwks_url) {
            (None, None) => {
                return Err(bad(
                    "JWT_SECRET",
                    "one of JWT_SECRET or JWT_JWKS_URL is required",
                ));
            }
            (Some(s), _) if s.len() < 16 => {
                return Err(bad("JWT_SECRET", "must be at least 16 bytes"));
            }
            _ => {}
        }
        if let Some(url) = &self.jwt_jwks_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(bad("JWT_JWKS_URL", "must be an http(s) URL"));
        }
        self.validate_redis()?;
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(bad("DATABASE_URL", "must be a postgres:// URL"));
        }
        if let Some(url) = &self.database_listen_url
            && url != "off"
        {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(bad(
                    "DATABASE_LISTEN_URL",
                    "must be a postgres:// URL or off",
                ));
            }
            if self.database_url.is_none() {
                return Err(bad(
                    "DATABASE_LISTEN_URL",
                    "needs DATABASE_URL (the wake-up only speeds up the poller)",
                ));
            }
        }
        if self.jwt_restaurant_claim.trim().is_empty() {
            return Err(bad("JWT_RESTAURANT_CLAIM", "must not be empty"));
        }
        // Every duration and size has a floor and a ceiling: an absurd value
        // (a typo, an extra zero, u64::MAX) must stop the process here, not
        // overflow date or Instant arithmetic later inside a background task.
        within("JWT_LEEWAY_SECONDS", self.jwt_leeway_seconds, 0, 300, "s")?;
        within(
            "JWT_JWKS_MAX_AGE_SECS",
            self.jwt_jwks_max_age_secs,
            1,
            86_400,
            "s",
        )?;
        within(
            "POLL_INTERVAL_MS",
            self.poll_interval_ms,
            100,
            HOUR_MS,
            "ms",
        )?;
        if let Some(ttl) = self.leader_ttl_ms {
            within("LEADER_TTL_MS", ttl, 200, HOUR_MS, "ms")?;
            if ttl < 2 * self.poll_interval_ms.min(1000) {
                return Err(bad(
                    "LEADER_TTL_MS",
                    "must be at least 2 x min(POLL_INTERVAL_MS, 1000)",
                ));
            }
        }
        // Beyond the poller's 15-minute look-back the overlap changes nothing.
        within(
            "POLL_OVERLAP_MS",
            self.poll_overlap_ms,
            0,
            15 * MINUTE_MS,
            "ms",
        )?;
        within(
            "MAX_CONNECTIONS",
            self.max_connections as u64,
            1,
            10_000_000,
            "",
        )?;
        within(
            "MAX_CONNECTIONS_PER_RESTAURANT",
            self.max_connections_per_restaurant as u64,
            1,
            10_000_000,
            "",
        )?;
        within(
            "HEARTBEAT_INTERVAL_MS",
            self.heartbeat_interval_ms,
            100,
            10 * MINUTE_MS,
            "ms",
        )?;
        within(
            "SEND_QUEUE_CAPACITY",
            self.send_queue_capacity as u64,
            1,
            65_536,
            "",
        )?;
        within(
            "MIN_SEND_BYTES_PER_SEC",
            self.min_send_bytes_per_sec,
            1024,
            1_000_000_000,
            "",
        )?;
        within(
            "CLIENT_MESSAGE_RATE",
            u64::from(self.client_message_rate),
            1,
            10_000,
            "",
        )?;
        within(
            "SHUTDOWN_DRAIN_MS",
            self.shutdown_drain_ms,
            0,
            10 * MINUTE_MS,
            "ms",
        )?;
        within(
            "HISTORY_MAX_EVENTS",
            self.history_max_events,
            1,
            1_000_000,
            "",
        )?;
        within(
            "HISTORY_MAX_AGE_SECS",
            self.history_max_age_secs,
            1,
            7 * 24 * 3600,
            "s",
        )?;
        within("PRESENCE_TTL_MS", self.presence_ttl_ms, 1000, HOUR_MS, "ms")?;
        within(
            "MEMBERSHIP_RECHECK_MS",
            self.membership_recheck_ms,
            100,
            HOUR_MS,
            "ms",
        )?;
        if let Some(origins) = &self.allowed_origins
            && origins.split(',').any(|o| o.trim().is_empty())
        {
            return Err(bad("ALLOWED_ORIGINS", "empty entry in the comma list"));
        }
        if let Some(key) = &self.publish_api_key
            && key.len() < 16
        {
            return Err(bad("PUBLISH_API_KEY", "must be at least 16 bytes"));
        }
        if let Some(id) = &self.instance_id
            && (id.is_empty() || id.len() > 128 || id.contains(char::is_whitespace))
        {
            return Err(bad("INSTANCE_ID", "1-128 characters, no spaces"));
        }
        within(
            "REDIS_LOST_CLOSE_MS",
            self.redis_lost_close_ms,
            1_000,
            HOUR_MS,
            "ms",
        )?;
        within(
            "HEADER_READ_TIMEOUT_MS",
            self.header_read_timeout_ms,
            100,
            10 * MINUTE_MS,
            "ms",
        )?;
        if !(self.header_read_timeout_ms..=600_000).contains(&self.handshake_timeout_ms) {
            return Err(bad(
                "HANDSHAKE_TIMEOUT_MS",
                "must be between HEADER_READ_TIMEOUT_MS and 600000",
            ));
        }
        within(
            "MAX_HANDSHAKES",
            self.max_handshakes as u64,
            1,
            1_000_000,
            "",
        )?;
        if self.log_format != "text" && self.log_format != "json" {
            return Err(bad("LOG_FORMAT", "must be text or json"));
        }
        if self.instance_id.is_none() {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "gw".into());
            let suffix = Uuid::new_v4().simple().to_string();
            self.instance_id = Some(format!("{host}-{}", &suffix[..8]));
        }
        Ok(())
    }

    /// At most one Redis mode, every URL parseable, a sentinel master name
    /// exactly when there are sentinels. An empty variable counts as unset
    /// (so an override file can switch modes).
    fn validate_redis(&mut self) -> Result<(), ConfigError> {
        for v in [
            &mut self.redis_url,
            &mut self.redis_cluster_urls,
            &mut self.redis_sentinel_urls,
            &mut self.redis_sentinel_master,
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                *v = None;
            }
        }
        let set = [
            ("REDIS_URL", self.redis_url.is_some()),
            ("REDIS_CLUSTER_URLS", self.redis_cluster_urls.is_some()),
            ("REDIS_SENTINEL_URLS", self.redis_sentinel_urls.is_some()),
        ];
        let chosen: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(v, _)| *v).collect();
        if chosen.len() > 1 {
            return Err(bad(
                chosen[1],
                format!("set only one of {} (one Redis mode)", chosen.join(", ")),
            ));
        }
        let check_url = |var: &'static str, url: &str| -> Result<(), ConfigError> {
            redis::Client::open(url)
                .map(|_| ())
                .map_err(|e| bad(var, format!("not a Redis URL: {url:?} ({e})")))
        };
        let check_list = |var: &'static str, list: &str| -> Result<(), ConfigError> {
            let urls = split_list(list);
            if urls.is_empty() || list.split(',').any(|u| u.trim().is_empty()) {
                return Err(bad(var, "empty entry in the comma list"));
            }
            urls.iter().try_for_each(|u| check_url(var, u))
        };
        if let Some(url) = &self.redis_url {
            check_url("REDIS_URL", url)?;
        }
        if let Some(list) = &self.redis_cluster_urls {
            check_list("REDIS_CLUSTER_URLS", list)?;
        }
        if let Some(list) = &self.redis_sentinel_urls {
            check_list("REDIS_SENTINEL_URLS", list)?;
        }
        match (&self.redis_sentinel_urls, &self.redis_sentinel_master) {
            (Some(_), None) => Err(bad(
                "REDIS_SENTINEL_MASTER",
                "required with REDIS_SENTINEL_URLS (the monitored master's name)",
            )),
            (Some(_), Some(name)) if name.trim().is_empty() => {
                Err(bad("REDIS_SENTINEL_MASTER", "must not be empty"))
            }
            (None, Some(_)) => Err(bad(
                "REDIS_SENTINEL_MASTER",
                "only meaningful with REDIS_SENTINEL_URLS",
            )),
            _ => Ok(()),
        }
    }

    /// Which Redis, if any (valid after [`Config::validate`]).
    pub fn redis_mode(&self) -> Option<RedisMode> {
        if let Some(url) = &self.redis_url {
            return Some(RedisMode::Single(url.clone()));
        }
        if let Some(list) = &self.redis_cluster_urls {
            return Some(RedisMode::Cluster(split_list(list)));
        }
        if let (Some(list), Some(master)) = (&self.redis_sentinel_urls, &self.redis_sentinel_master)
        {
            return Some(RedisMode::Sentinel {
                sentinels: split_list(list),
                master: master.trim().to_string(),
            });
        }
        None
    }

    pub fn instance_id(&self) -> &str {
        self.instance_id.as_deref().unwrap_or("unset")
    }
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    /// Where the poller leader LISTENs for wake-ups; `None`: no wake-up
    /// (no database, or DATABASE_LISTEN_URL=off).
    pub fn listen_url(&self) -> Option<&str> {
        match self.database_listen_url.as_deref() {
            Some("off") => None,
            Some(url) => Some(url),
            None => self.database_url.as_deref(),
        }
    }
    pub fn leader_ttl(&self) -> Duration {
        Duration::from_millis(self.leader_ttl_ms.unwrap_or(3 * self.poll_interval_ms))
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn presence_ttl(&self) -> Duration {
        Duration::from_millis(self.presence_ttl_ms)
    }
    pub fn allowed_origins(&self) -> Option<Vec<String>> {
        self.allowed_origins.as_ref().map(|s| {
            s.split(',')
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect()
        })
    }
    pub fn history_limits(&self) -> HistoryLimits {
        HistoryLimits {
            max_events: self.history_max_events,
            max_age: Duration::from_secs(self.history_max_age_secs),
        }
    }
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

/// The Redis the replicas share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisMode {
    /// One Redis server (`REDIS_URL`).
    Single(String),
    /// Seed nodes of a Redis Cluster (`REDIS_CLUSTER_URLS`).
    Cluster(Vec<String>),
    /// Sentinels and the name of the master they monitor.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// How much history a broker keeps per restaurant.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    pub max_events: u64,
    pub max_age: Duration,
}
