# syntax=docker/dockerfile:1
#
# orders-gateway container image.
#
#   docker build -t orders-gateway .
#   docker run --rm -p 8080:8080 -e JWT_SECRET=... orders-gateway
#
# Two stages:
#   builder  rust:1-bookworm. Dependencies are compiled in their own layer from
#            Cargo.toml + Cargo.lock and stub sources, so editing src/ only
#            recompiles this crate.
#   runtime  debian:bookworm-slim (same glibc as the builder), the binary, CA
#            certificates (JWKS over HTTPS), curl for HEALTHCHECK, tini as PID 1.
#            Runs as uid/gid 10001, needs no writable filesystem.
#
# No secret is baked in: JWT_SECRET, REDIS_URL, DATABASE_URL and
# PUBLISH_API_KEY come from the environment at run time.

ARG RUST_VERSION=1

############################ builder ##########################################
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# 1) Dependency layer. Only the manifest, the lockfile and the stub helper are
#    copied, so this layer is reused until one of them changes. The helper
#    writes an empty stub for every target source file the manifest declares
#    (src/main.rs, src/lib.rs, [[bin]]/[[bench]]/[[test]] paths), so cargo can
#    build all dependencies without our code. Afterwards the stub build of our
#    own crate is forgotten (COPY keeps the real sources' old mtimes, so cargo
#    could otherwise take the stub artifacts for fresh); dependencies stay.
COPY deploy/docker/cargo-stubs.sh /usr/local/bin/cargo-stubs
COPY Cargo.toml Cargo.lock ./
RUN set -eu; \
    sh /usr/local/bin/cargo-stubs Cargo.toml > /tmp/stubs; \
    cargo build --release --locked; \
    xargs rm -f < /tmp/stubs; \
    rm -rf target/release/orders-gateway target/release/orders-gateway.d \
           target/release/deps/orders_gateway-* target/release/deps/liborders_gateway-* \
           target/release/.fingerprint/orders-gateway-*

# 2) The real build. .dockerignore keeps target/, .git/ and the deploy files
#    out of the context, so the context is only what the binary is built from
#    (src/, migrations/, web/, clients/ are embedded in the binary).
COPY . .
RUN set -eu; \
    find src -name '*.rs' -exec touch {} +; \
    cargo build --release --locked --bin orders-gateway; \
    install -D -m 0755 target/release/orders-gateway /out/orders-gateway

############################ runtime ##########################################
FROM debian:bookworm-slim AS runtime

RUN set -eu; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates curl tini; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 gateway; \
    useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=builder /out/orders-gateway /usr/local/bin/orders-gateway

# Non-secret defaults only; everything else comes from the environment.
ENV BIND_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json

USER 10001:10001
EXPOSE 8080

# Liveness of the process (not of Redis: that is /readyz). The port follows
# BIND_ADDR so an overridden listener is still probed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD port="${BIND_ADDR##*:}"; curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:${port:-8080}/healthz" || exit 1

# SIGTERM starts the graceful drain (readiness 503, sockets closed with 1001
# within SHUTDOWN_DRAIN_MS). tini forwards it and reaps children.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/orders-gateway"]
CMD ["serve"]
