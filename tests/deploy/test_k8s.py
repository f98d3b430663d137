"""Kubernetes manifests: schema validation (kubernetes-validate, offline) and the
properties the deployment relies on."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
import yaml

from ._support import DEPLOY, ROOT

K8S = DEPLOY / "k8s"
# Not Kubernetes API objects: checked separately.
NOT_RESOURCES = {"kustomization.yaml"}
# The oldest Kubernetes these manifests target, and the newest the validator knows.
VERSIONS = ["1.27.0", None]


def _kv():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("the Python package `kubernetes-validate` is missing: pip install kubernetes-validate",
                    pytrace=False)
    return kubernetes_validate


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in NOT_RESOURCES:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _by_kind(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_manifest_passes_the_schema():
    kv = _kv()
    docs = _documents()
    assert len(docs) >= 9
    for version in VERSIONS:
        version = version or kv.latest_version()
        for name, doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes "
                            f"{version}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_the_required_objects_exist():
    kinds = {(d["apiVersion"], d["kind"]) for _, d in _documents()}
    for wanted in [("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Secret"), ("apps/v1", "Deployment"),
                   ("v1", "Service"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
                   ("policy/v1", "PodDisruptionBudget")]:
        assert wanted in kinds, wanted
    for _, d in _documents():
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "llm-gateway", d["metadata"]["name"]


def test_kustomization_lists_every_manifest_but_the_secret_template():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - NOT_RESOURCES - {"secret.example.yaml"}
    assert set(kust["resources"]) == files
    assert "secret.example.yaml" not in kust["resources"]


def test_configmap_is_the_docker_config_and_valid():
    cm = _by_kind("ConfigMap", "gateway-config")
    text = cm["data"]["gateway.toml"]
    assert text == (DEPLOY / "gateway.docker.toml").read_text(), \
        "deploy/k8s/configmap.yaml and deploy/gateway.docker.toml differ"
    cfg = tomllib.loads(text)
    assert cfg["auth"]["keys"], "a non-loopback bind needs [[auth.keys]]"
    assert cfg["redis"]["url"] == "redis://redis:6379/0"
    assert cfg["local"]["url"] == "http://local-backend:8001/v1"
    # Services of those names exist.
    _by_kind("Service", "redis")
    _by_kind("Service", "local-backend")


def test_gateway_check_config_accepts_the_docker_config():
    r = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(DEPLOY / "gateway.docker.toml")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_secret_is_a_template_with_the_provider_keys():
    secret = _by_kind("Secret", "gateway-secrets")
    data = secret["stringData"]
    assert {"NOVITA_API_KEY", "DEEPINFRA_TOKEN", "OPENROUTER_API_KEY", "GATEWAY_API_KEY"} <= set(data)
    assert all("REPLACE" in v for v in data.values()), "placeholders only, never real keys"


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_gateway_deployment():
    dep = _by_kind("Deployment", "gateway")
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "gateway-secrets"} in [e.get("secretRef") for e in c["envFrom"]]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/etc/gateway"] == "config" and "/tmp" in mounts
    assert "/etc/gateway/gateway.toml" in c["command"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        obj = _by_kind(kind, "gateway")
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    hpa = _by_kind("HorizontalPodAutoscaler", "gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2
