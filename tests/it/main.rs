//! Integration tests: one binary, real redis-server and PostgreSQL.
mod support;

mod auth;
mod broker_conformance;
mod cluster;
mod faults;
mod hostile;
mod poller;
mod resume;
mod resync_storm;
mod startup;
mod topology;
mod wakeup;
mod websocket;
