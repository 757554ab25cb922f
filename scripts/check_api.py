#!/usr/bin/env python3
"""Holds docs/openapi.json to the gateway's code. Run through scripts/check-api.sh.

  1. docs/openapi.json is a valid OpenAPI 3.1 document (openapi-spec-validator);
  2. its paths and methods are exactly the routes src/http/mod.rs registers;
  3. Schemathesis against a live gateway (the real binary, embedded broker,
     no database): generated requests for every operation, malformed ones
     included, with every check (no 5xx, statuses, content types, headers
     and bodies as documented, bad input rejected, auth not ignored); every
     operation of the document must have been tested;
  4. the Grafana dashboard (deploy/grafana/orders-gateway.json) against what
     that same live gateway exports: after publishes and WebSocket sessions,
     every metric and label name its queries use is in a GET /metrics scrape.
     Metrics this run cannot produce (the poller needs a database, the Redis
     link metrics Redis, ...) pass only if src/ names them, and are listed.

Prints one line per check and finally `N passed, M failed`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

from grafana_queries import panel_queries, variable_queries

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "docs" / "openapi.json"
DASHBOARD = ROOT / "deploy" / "grafana" / "orders-gateway.json"
SRC = ROOT / "src"
ROUTER = ROOT / "src" / "http" / "mod.rs"
GATEWAY_BIN = Path(os.environ.get("GATEWAY_BIN", ROOT / "target" / "debug" / "orders-gateway"))
VENV_BIN = Path(sys.executable).parent
# Enough generated cases per operation to reach malformed bodies, headers and
# parameters, bounded for a 2-core CI machine. A fixed seed keeps CI stable;
# SCHEMATHESIS_SEED=random explores new inputs.
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "60"))
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261129")


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            self.failed += 1
            print(f"FAIL  {name}\n      {e}")
            if os.environ.get("CHECK_API_VERBOSE"):
                traceback.print_exc()
        else:
            self.passed += 1
            print(f"ok    {name}")
        sys.stdout.flush()

    def summary(self) -> int:
        print(f"{self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def check_openapi_valid() -> None:
    from openapi_spec_validator import validate  # noqa: PLC0415 - only in the venv
    from openapi_spec_validator.readers import read_from_filename  # noqa: PLC0415

    spec, _ = read_from_filename(str(OPENAPI))
    expect(spec["openapi"].startswith("3.1"), f"openapi {spec['openapi']}, want 3.1")
    validate(spec)


def router_routes() -> set[tuple[str, str]]:
    """(METHOD, path) for every `.route(path, method(handler))` in the router."""
    text = ROUTER.read_text()
    routes = set()
    for m in re.finditer(r'\.route\(\s*"([^"]+)",\s*(.*?)\)\s*(?=\n\s*\.(?:route|fallback|layer|with_state))', text, re.S):
        path, handlers = m.group(1), m.group(2)
        for method in re.findall(r"\b(get|post|put|patch|delete)\(", handlers):
            routes.add((method.upper(), path))
    expect(len(routes) >= 10, f"parsed only {len(routes)} routes from {ROUTER}")
    return routes


HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def documented_operations() -> set[tuple[str, str]]:
    """(METHOD, path) for every operation of docs/openapi.json."""
    doc = json.loads(OPENAPI.read_text())
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops if method in HTTP_METHODS}


def check_paths_match_router() -> None:
    documented = documented_operations()
    code = router_routes()
    expect(not code - documented, f"routes missing from docs/openapi.json: {sorted(code - documented)}")
    expect(not documented - code, f"documented but not routed: {sorted(documented - code)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(secret: str, claims: dict) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


class Gateway:
    def __init__(self) -> None:
        self.port = free_port()
        self.secret = secrets.token_hex(24)
        self.api_key = secrets.token_hex(16)
        self.restaurant = "6f1c2a57-3c1e-4a8e-9d0b-6a1f0c2b9e11"
        self.log = tempfile.NamedTemporaryFile(prefix="check-api-gateway-", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "DATABASE_URL", "JWT_JWKS_URL", "JWT_AUDIENCE", "JWT_ISSUER", "ALLOWED_ORIGINS", "DEMO")}
        env.update(BIND_ADDR=f"127.0.0.1:{self.port}", JWT_SECRET=self.secret, PUBLISH_API_KEY=self.api_key,
                   SHUTDOWN_DRAIN_MS="500", RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.proc = subprocess.Popen([str(GATEWAY_BIN)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"gateway did not start:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        now = int(time.time())
        return hs256(self.secret, {"sub": "4b0e8c5e-5a7e-4d61-a3f5-2f8f3f4f6a01", "restaurant_id": self.restaurant,
                                   "iat": now, "exp": now + 3600})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def crashed(self) -> str | None:
        text = Path(self.log.name).read_text()
        return text[-3000:] if self.proc.poll() is not None or "panicked" in text else None


def schemathesis_config(gw: Gateway, report: Path) -> str:
    """Per-operation credentials; the WebSocket route is only an upgrade."""
    dashboard = f"Bearer {gw.token()}"
    publish = f"Bearer {gw.api_key}"
    return f'''
seed = {SEED if SEED != "random" else secrets.randbelow(2**31)}
workers = 1
request-timeout = 10
[generation]
max-examples = {MAX_EXAMPLES}
database = "none"
[phases.stateful]
enabled = false
[reports.junit]
enabled = true
path = "{report}"

[[operations]]
include-path = ["/api/ws/orders/live/status", "/api/ws/orders/live/connections"]
headers = {{ Authorization = "{dashboard}" }}

[[operations]]
include-path = "/api/orders/events"
headers = {{ Authorization = "{publish}" }}

# A plain HTTP request to the WebSocket route is never accepted: the socket
# protocol starts only after an upgrade (docs/asyncapi.yaml).
[[operations]]
include-path = "/api/ws/orders/live"
[operations.checks.positive_data_acceptance]
expected-statuses = ["400", "426"]
[operations.checks.negative_data_rejection]
expected-statuses = ["400", "426"]
'''


class LiveGateway:
    """One gateway for the checks that need it, started on first use."""

    def __init__(self) -> None:
        self.gw: Gateway | None = None

    def get(self) -> Gateway:
        if self.gw is None:
            expect(GATEWAY_BIN.exists(), f"gateway binary {GATEWAY_BIN} missing (cargo build, or set GATEWAY_BIN)")
            self.gw = Gateway()
        crash = self.gw.crashed()
        expect(crash is None, f"the gateway died or panicked:\n{crash}")
        return self.gw

    def stop(self) -> None:
        if self.gw is not None:
            self.gw.stop()


def check_schemathesis(live: LiveGateway) -> None:
    gw = live.get()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "schemathesis.toml"
        report = Path(tmp) / "junit.xml"
        config.write_text(schemathesis_config(gw, report))
        cmd = [str(VENV_BIN / "schemathesis"), "--config-file", str(config), "run", f"{gw.url}/api/openapi.json",
               "--url", gw.url, "--checks", "all", "--no-color",
               # Schemathesis leaves out the operation that served the document
               # (GET /api/openapi.json) unless a filter selects it: this one
               # selects every path, so every documented operation is tested.
               "--include-path-regex", "^/",
               # Stay on loopback, bounded: each case is one small request.
               "--max-time", os.environ.get("SCHEMATHESIS_MAX_TIME", "150")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
        out = proc.stdout + proc.stderr
        artifacts = ROOT / "target" / "check-api"
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "schemathesis.log").write_text(out)
        if report.exists():
            (artifacts / "schemathesis-junit.xml").write_text(report.read_text())
        crash = gw.crashed()
        expect(crash is None, f"the gateway died or panicked under Schemathesis:\n{crash}")
        tail = "\n".join(out.splitlines()[-60:])
        expect(proc.returncode == 0, f"schemathesis exited {proc.returncode} (full log: target/check-api/schemathesis.log):\n{tail}")
        operations = re.search(r"Tested: (\d+)", out)
        cases = re.search(r"(\d+) generated", out)
        print(f"      schemathesis: {operations and operations.group(1)} operations, {cases and cases.group(1)} generated cases")
        # Exit 0 also when an operation was skipped or filtered out (a
        # config typo, an unsupported schema): it must have tested all.
        documented = {f"{m} {p}" for m, p in documented_operations()}
        tested = set(re.findall(r'<testcase\b[^>]*\bname="([A-Z]+ [^"]+)"', report.read_text())) if report.exists() else set()
        expect(operations is not None, f"no 'Tested: N' line in the Schemathesis output:\n{tail}")
        expect(int(operations.group(1)) == len(documented) and not documented - tested,
               f"Schemathesis tested {operations.group(1)} operations; docs/openapi.json has {len(documented)}; "
               f"not tested: {sorted(documented - tested)}")


# --------------------------------------------------------------------------
# The Grafana dashboard against a live /metrics
# --------------------------------------------------------------------------

class WebSocket:
    """A bare RFC 6455 client: enough to open, read, ping and close a socket
    (the venv holds no WebSocket library, and this check needs no more)."""

    def __init__(self, port: int, target: str, timeout: float = 5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            expect(chunk, "connection closed during the WebSocket handshake")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode()
        expect(" 101 " in status, f"WebSocket upgrade refused: {status}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            expect(chunk, "socket closed by the gateway mid-frame")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    @staticmethod
    def frame(payload: bytes, opcode: int = 1) -> bytes:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, payload: bytes, opcode: int = 1) -> None:
        self.sock.sendall(self.frame(payload, opcode))

    def send_many(self, payloads: list[bytes]) -> None:
        self.sock.sendall(b"".join(self.frame(p) for p in payloads))

    def recv(self) -> dict | int:
        """The next text message as JSON, or the close code once closed."""
        message, kind = b"", None
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._read(2), "big")
            elif n == 127:
                n = int.from_bytes(self._read(8), "big")
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if opcode == 9:
                self.send(payload, opcode=10)
                continue
            if opcode == 10:
                continue
            kind = kind or opcode
            message += payload
            if b0 & 0x80:
                if kind == 1:
                    return json.loads(message)
                message, kind = b"", None

    def recv_type(self, wanted: str) -> dict:
        while True:
            m = self.recv()
            expect(isinstance(m, dict), f"socket closed ({m}) while waiting for {wanted}")
            if m.get("type") == wanted:
                return m

    def close(self) -> int:
        self.send((1000).to_bytes(2, "big"), opcode=8)
        while True:
            m = self.recv()
            if isinstance(m, int):
                self.sock.close()
                return m


def publish(gw: Gateway, event_type: str, order: dict) -> dict:
    req = urllib.request.Request(f"{gw.url}/api/orders/events", method="POST",
                                 data=json.dumps({"type": event_type, "order": order}).encode(),
                                 headers={"Authorization": f"Bearer {gw.api_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        expect(r.status in (200, 202), f"publish {event_type}: HTTP {r.status}")
        return json.loads(r.read() or b"{}")


def exercise(gw: Gateway) -> None:
    """Makes the gateway record what a busy service records: a socket that
    receives a published event (deliveries, latency), a duplicate publish,
    a resume from history, a normal close, a refused token, a flooding client."""
    from datetime import datetime, timezone  # noqa: PLC0415

    now = datetime.now(timezone.utc).isoformat()
    order_id = "3d0f3c1e-8a4b-4c55-9f8e-1b2c3d4e5f60"
    order = {"id": order_id, "order_number": "ORD-CHECK-API-0001", "restaurant_id": gw.restaurant,
             "table_number": 4, "customer_name": "check-api", "customer_phone": "+15550100",
             "order_status": "pending", "payment_status": "pending", "payment_method": "card",
             "total_price": 12.5, "estimated_time": 15, "created_at": now, "updated_at": now,
             "items": [{"id": "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "menu_item_id": "0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e",
                        "quantity": 1, "unit_price": 12.5}]}
    ws = WebSocket(gw.port, f"/api/ws/orders/live?token={gw.token()}")
    ws.recv_type("connection_established")
    publish(gw, "order_created", order)
    event = ws.recv_type("order_created")
    publish(gw, "order_created", order)  # the same version again: deduplicated
    expect(ws.close() == 1000, "normal close")

    ws = WebSocket(gw.port, f"/api/ws/orders/live?token={gw.token()}&last_event_id={event['event_id']}")
    established = ws.recv_type("connection_established")
    expect(established.get("resumed") is True, f"resume from history: {established}")
    ws.close()

    ws = WebSocket(gw.port, "/api/ws/orders/live?token=not-a-token")
    expect(ws.recv() == 4401, "a bad token is refused with 4401")

    # Past the burst (2 x CLIENT_MESSAGE_RATE, default 10) in one write, then
    # only read: the gateway reads it all at once, so it closes with an empty
    # receive buffer (FIN, not a reset that could eat its close frame).
    ws = WebSocket(gw.port, f"/api/ws/orders/live?token={gw.token()}")
    ws.recv_type("connection_established")
    ws.send_many([b'{"type":"ping"}'] * 30)
    code = ws.recv()
    while isinstance(code, dict):
        code = ws.recv()
    expect(code == 4429, f"a flooding client is closed with 4429, got {code}")


# Added by Prometheus to every series it scrapes (the target's labels), never
# exported by the gateway itself.
TARGET_LABELS = {"instance", "job"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def scrape(gw: Gateway) -> dict[str, set[str]]:
    """Series name -> label names, from GET /metrics."""
    with urllib.request.urlopen(f"{gw.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    series: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        if not m or line.startswith("#"):
            continue
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""))
        series.setdefault(m.group(1), set()).update(labels)
    return series


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel query (nested rows too) and query variable."""
    out = panel_queries(DASHBOARD)
    for name, q in variable_queries(DASHBOARD):
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q)
        # label_values(selector, label): the label must be on the selector's series.
        out.append((f"variable ${name}", f"sum by ({m.group(2)}) ({m.group(1)})" if m else q))
    expect(len(out) >= 10, f"found only {len(out)} queries in {DASHBOARD.relative_to(ROOT)}")
    return out


def query_names(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names a PromQL query uses."""
    metrics = set(re.findall(r"\b(orders_gateway_[a-z0-9_]+)\b", expr))
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"', matchers))
    return metrics, labels - PROMQL_WORDS


def source_metrics() -> dict[str, str]:
    """Metric name -> the text of the src/ files naming it (quoted literal)."""
    found: dict[str, str] = {}
    for path in SRC.rglob("*.rs"):
        if path.name == "loadgen.rs":
            continue
        text = path.read_text()
        for name in re.findall(r'"(orders_gateway_[a-z0-9_]+)"', text):
            found[name] = found.get(name, "") + text
    return found


def statically_has_label(src_text: str, metric: str, label: str) -> bool:
    """The label key on the metric's macro call: `counter!("name", "label" => ...)`."""
    if label == "le":
        return re.search(rf'histogram!\(\s*"{metric}"', src_text) is not None
    return re.search(rf'"{metric}"\s*,(?:[^;]*?)"{label}"\s*=>', src_text, re.S) is not None


def check_dashboard_metrics_live(live: LiveGateway) -> None:
    gw = live.get()
    exercise(gw)
    series = scrape(gw)
    expect(any(n.startswith("orders_gateway_") for n in series), "GET /metrics has no orders_gateway_ series")
    src = source_metrics()
    problems, static_only = [], set()
    for where, expr in dashboard_queries():
        metrics, labels = query_names(expr)
        for name in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr):
            if not name.startswith("orders_gateway_"):
                problems.append(f"{where}: {name} is not a gateway metric")
        for metric in sorted(metrics):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            if metric in series:
                missing = sorted(labels - TARGET_LABELS - series[metric])
                if missing:
                    problems.append(f"{where}: {metric} has no label {missing} (scraped: {sorted(series[metric])})")
            elif {base, f"{base}_bucket", f"{base}_sum", f"{base}_count"} & series.keys():
                # Produced, but not as the series the query reads (a summary
                # where the query wants histogram buckets, a renamed suffix).
                problems.append(f"{where}: {metric} not in the scrape, which has "
                                f"{sorted(n for n in series if n == base or n.startswith(base + '_'))}")
            elif metric in src or base in src:
                # Not produced in this run (no database, no Redis, no slow
                # client): the code must at least name it and its labels.
                static_only.add(metric)
                text = src.get(base) or src.get(metric)
                for label in sorted(labels - TARGET_LABELS):
                    if not statically_has_label(text, base, label):
                        problems.append(f"{where}: {metric} not scraped, and src/ gives it no label {label!r}")
            else:
                problems.append(f"{where}: {metric} is neither in the scrape nor in src/")
    live_ok = sorted({m for _, e in dashboard_queries() for m in query_names(e)[0]} - static_only)
    print(f"      verified against the live scrape: {len(live_ok)} metrics: {', '.join(live_ok)}")
    print(f"      verified only statically (src/; not produced without a database/Redis/slow client): "
          f"{len(static_only)}: {', '.join(sorted(static_only)) or '-'}")
    expect(not problems, "the dashboard queries names the gateway does not export:\n" + "\n".join(problems))


def main() -> int:
    os.chdir(ROOT)
    r = Runner()
    print("== OpenAPI")
    r.check("openapi: docs/openapi.json is valid OpenAPI 3.1", check_openapi_valid)
    r.check("openapi: documents exactly the routes of src/http/mod.rs", check_paths_match_router)
    live = LiveGateway()
    try:
        r.check("openapi: Schemathesis against a live gateway (every operation, malformed input, all checks)",
                check_schemathesis, live)
        print("== Grafana")
        r.check("grafana: every metric and label the dashboard queries is in the live gateway's /metrics",
                check_dashboard_metrics_live, live)
    finally:
        live.stop()
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
