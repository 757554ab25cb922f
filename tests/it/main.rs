//! Integration tests: one binary, real redis-server and PostgreSQL.
mod support;

mod ha;

mod auth;
mod broker_conformance;
mod cluster;
mod failover;
mod faults;
mod poller;
mod resume;
mod startup;
mod topology;
mod websocket;
