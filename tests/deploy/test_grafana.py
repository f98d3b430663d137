"""Grafana: the dashboard queries documented metrics only, and its PromQL parses."""

from __future__ import annotations

import json
import subprocess

import yaml

from ._support import DEPLOY, DOCUMENTED, metric_names, tool

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gateway.json"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def _queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for p in _panels(dash):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def test_dashboard_queries_only_documented_metrics():
    used: set[str] = set()
    for where, expr in _queries(_dashboard()):
        names = metric_names(expr)
        unknown = names - DOCUMENTED
        assert not unknown, f"{where} queries undocumented metrics {sorted(unknown)}: {expr}"
        used |= names
    # The dashboard shows every documented metric somewhere.
    assert used == DOCUMENTED, f"not on the dashboard: {sorted(DOCUMENTED - used)}"


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
                       ("${model}", ".*"), ("$model", ".*"), ("${key}", ".*"), ("$key", ".*")):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_dashboard_promql_parses(tmp_path):
    """Every panel query, as a recording rule, passes `promtool check rules`."""
    rules = [{"record": f"dashboard:query:{i}", "expr": _as_promql(expr)}
             for i, (where, expr) in enumerate(_queries(_dashboard())) if not where.startswith("variable")]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool("promtool", "/usr/bin/promtool", apt="prometheus"), "check", "rules", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_structure():
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    # Every panel reads the provisioned Prometheus through the datasource variable.
    names = {v["name"] for v in dash["templating"]["list"]}
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] in {"${datasource}", "$datasource"} | names, p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("request rate", "error rate", "overhead", "first token", "tokens / s", "cost",
                   "failovers", "circuit", "rejections", "in flight", "queue", "batch"):
        assert wanted in titles, f"no panel about {wanted!r}"


def test_provisioning_points_at_the_dashboards_and_prometheus():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090"
    current = next(v for v in _dashboard()["templating"]["list"] if v["name"] == "datasource")["current"]
    assert current["value"] in {prom["uid"], prom["name"]}
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "gateway.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    # docker-compose mounts deploy/grafana/dashboards there.
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("./grafana/dashboards:" + path) for m in mounts), mounts
