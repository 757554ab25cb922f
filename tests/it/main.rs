//! Integration tests: one binary, real redis-server and PostgreSQL.
mod support;

mod broker_conformance;
