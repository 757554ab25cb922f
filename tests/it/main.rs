//! Integration tests: one binary, real redis-server and PostgreSQL.
mod support;

mod auth;
mod broker_conformance;
mod poller;
mod websocket;
