"""The PromQL queries of the operators' Grafana dashboard, for the checks
that hold it to the gateway (check_deploy.py: it parses; check_api.py: it
names what a live gateway exports). No dependencies beyond the standard
library: each check runs in its own virtualenv."""

import json
from pathlib import Path


def panel_queries(dashboard: Path) -> list[tuple[str, str]]:
    """(panel title, expr) for every panel query, nested rows included."""
    doc = json.loads(dashboard.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(doc["panels"])
    return out


def variable_queries(dashboard: Path) -> list[tuple[str, str]]:
    """(variable name, query) for every query-type template variable."""
    doc = json.loads(dashboard.read_text())
    out = []
    for v in doc.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and isinstance(q, str):
            out.append((v["name"], q))
    return out
