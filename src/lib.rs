//! orders-gateway: real-time order notifications for restaurant dashboards.
//!
//! Module map, dependencies pointing down:
//!
//! ```text
//! app      wires everything, owns the shutdown order
//! http     router, extractors, ApiError, access (token -> restaurant)
//! session  one socket: catch-up, then one select! loop; close codes
//! snapshots one shared snapshot read per restaurant at a time (single flight)
//! node     hub + broker: subscribe on first socket, lazy unsubscribe, fan-out
//! poller   leader-elected change capture: diff (pure) + SQL + publish
//! hub      local sockets per restaurant, bounded queues      (no Redis, no SQL)
//! broker   Broker + Cluster traits; memory and Redis brokers (no sockets)
//! auth     token -> identity (HS256 / JWKS), origin policy   (no HTTP)
//! db       orders database reads and migrations
//! demo     demo restaurant and simulated guests
//! domain   ids, orders, events, frames                       (imports nothing of ours)
//! config   one Config from env/flags, validated at start
//! ```
pub mod app;
pub mod auth;
pub mod broker;
pub mod config;
pub mod db;
pub mod demo;
pub mod domain;
pub mod http;
pub mod hub;
pub mod node;
pub mod poller;
pub mod session;
pub mod snapshots;
