"""Prometheus config and alert rules: promtool checks, rule unit tests, metric names."""

from __future__ import annotations

import subprocess

import yaml

from ._support import DEPLOY, DOCUMENTED, metric_names, tool

PROM = DEPLOY / "prometheus"


def promtool() -> str:
    return tool("promtool", "/usr/bin/promtool", apt="prometheus")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_rules():
    r = run("check", "rules", str(PROM / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config():
    # Also checks the rule files the config loads (alerts.yml, relative to it).
    r = run("check", "config", str(PROM / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_rule_unit_tests():
    """The alerts fire on the series they are meant for, and only on those."""
    r = run("test", "rules", str(PROM / "alerts.test.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_config_loads_the_alert_rules():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]


def _rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_query_only_documented_metrics():
    used: set[str] = set()
    for rule in _rules():
        names = metric_names(rule["expr"])
        unknown = names - DOCUMENTED
        assert not unknown, f"{rule['alert']} queries undocumented metrics {sorted(unknown)}"
        used |= names
    assert used, "no gateway_*/local_backend_* metric found in the alert rules"


def test_the_required_alerts_exist():
    by_name = {rule["alert"]: rule for rule in _rules()}
    wanted = {
        "GatewayHighErrorRate": {"gateway_requests_total"},
        "GatewayModelUnavailable": {"gateway_endpoint_available"},
        "GatewayOverheadHigh": {"gateway_overhead_seconds"},
        "GatewayBudgetBurnDaily": {"gateway_cost_usd_total", "gateway_budget_usd"},
        "GatewayLimitStoreErrors": {"gateway_limit_store_errors_total"},
    }
    for alert, metrics in wanted.items():
        assert alert in by_name, f"alert {alert} is missing"
        assert metrics <= metric_names(by_name[alert]["expr"]), alert
        assert by_name[alert]["labels"]["severity"] in {"critical", "warning", "info"}
        assert by_name[alert]["annotations"]["summary"]
    # "every endpoint of a model down": summed by model, compared to zero.
    expr = " ".join(by_name["GatewayModelUnavailable"]["expr"].split())
    assert "sum by (model) (gateway_endpoint_available) == 0" in expr


def test_scrape_targets_are_compose_services():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"gateway", "local-backend"} <= set(jobs)
    for name in ("gateway", "local-backend"):
        for sc in jobs[name]["static_configs"]:
            for target in sc["targets"]:
                host, _, port = target.partition(":")
                assert host in compose["services"], f"scrape target {target} is no compose service"
                assert port in [str(p) for p in compose["services"][host].get("expose", [])], target
    gateways = {t for sc in jobs["gateway"]["static_configs"] for t in sc["targets"]}
    assert len(gateways) >= 2, "every gateway replica is scraped on its own"
