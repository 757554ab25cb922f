//! Integration tests: one binary, real redis-server and PostgreSQL.
mod support;

mod ha;

mod auth;
mod broker_conformance;
mod cluster;
mod failover;
mod faults;
mod fuzz;
mod hostile;
mod jwks;
mod poller;
mod resume;
mod resync_storm;
mod rolling;
mod startup;
mod supervision;
mod topology;
mod wakeup;
mod websocket;
