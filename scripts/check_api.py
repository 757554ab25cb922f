#!/usr/bin/env python3
"""Holds docs/openapi.json to the gateway's code. Run through scripts/check-api.sh.

  1. docs/openapi.json is a valid OpenAPI 3.1 document (openapi-spec-validator);
  2. its paths and methods are exactly the routes src/http/mod.rs registers;
  3. Schemathesis against a live gateway (the real binary, embedded broker,
     no database): generated requests for every operation, malformed ones
     included, with every check (no 5xx, statuses, content types, headers
     and bodies as documented, bad input rejected, auth not ignored); every
     operation of the document must have been tested.

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

ROOT = Path(__file__).resolve().parent.parent
OPENAPI = ROOT / "docs" / "openapi.json"
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


def check_schemathesis() -> None:
    expect(GATEWAY_BIN.exists(), f"gateway binary {GATEWAY_BIN} missing (cargo build, or set GATEWAY_BIN)")
    gw = Gateway()
    try:
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
    finally:
        gw.stop()


def main() -> int:
    os.chdir(ROOT)
    r = Runner()
    print("== OpenAPI")
    r.check("openapi: docs/openapi.json is valid OpenAPI 3.1", check_openapi_valid)
    r.check("openapi: documents exactly the routes of src/http/mod.rs", check_paths_match_router)
    r.check("openapi: Schemathesis against a live gateway (every operation, malformed input, all checks)", check_schemathesis)
    return r.summary()


if __name__ == "__main__":
    sys.exit(main())
