#!/usr/bin/env bash
# Install the benchmark's competitors under bench/, idempotently:
#   bench/.venv-litellm  LiteLLM proxy in its own venv (its wheels pin a certifi the registry lacks,
#                        so the wheel goes in with --no-deps and its requirements minus certifi after)
#   bench/.portkey       Portkey's gateway from npm
# Versions: LITELLM_VERSION and PORTKEY_VERSION override the defaults below.
set -euo pipefail

LITELLM_VERSION="${LITELLM_VERSION:-1.106.10}"
PORTKEY_VERSION="${PORTKEY_VERSION:-1.15.2}"
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$BENCH/.venv-litellm"
PORTKEY="$BENCH/.portkey"
PYTHON="${PYTHON:-python3}"

say() { printf '[install_competitors] %s\n' "$*"; }
# This machine's pip config names an extra index folder that is often absent: drop that warning, and the
# resolver's expected complaint about litellm's certifi pin.
quiet_pip() { "$VENV/bin/pip" "$@" 2> >(grep -v -e 'is ignored: it is neither a file nor a directory' \
    -e "dependency resolver does not currently" -e "requires certifi" >&2); }
export LITELLM_LOCAL_MODEL_COST_MAP=True  # no network fetch at import

install_litellm() {
    local have=""
    if [[ -x "$VENV/bin/python" ]]; then
        have="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null || true)"
    fi
    if [[ "$have" == "$LITELLM_VERSION" ]] && "$VENV/bin/python" -c 'import litellm.proxy.proxy_server' 2>/dev/null; then
        say "LiteLLM $have already in $VENV: nothing to do"
        return
    fi
    local t0=$SECONDS
    [[ -x "$VENV/bin/python" ]] || { say "creating venv $VENV"; "$PYTHON" -m venv "$VENV"; }
    say "pip install --no-deps litellm[proxy]==$LITELLM_VERSION"
    quiet_pip install -q --no-deps "litellm[proxy]==$LITELLM_VERSION"
    # Requires-Dist of the installed wheel, base and 'proxy' extra, markers evaluated here, certifi dropped.
    local reqs
    reqs="$("$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
from pip._vendor.packaging.requirements import Requirement
out = set()
for line in m.requires("litellm") or []:
    r = Requirement(line)
    if r.name.lower() == "certifi":
        continue
    if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", "proxy")):
        r.marker = None
        out.add(str(r))
print("\n".join(sorted(out)))
EOF
)"
    say "installing $(wc -l <<<"$reqs") requirements of litellm and its proxy extra (certifi left out)"
    # shellcheck disable=SC2086
    quiet_pip install -q certifi $(tr '\n' ' ' <<<"$reqs")
    "$VENV/bin/python" -c 'import litellm.proxy.proxy_server' >/dev/null
    say "LiteLLM $LITELLM_VERSION installed in $VENV in $((SECONDS - t0))s"
}

install_portkey() {
    local pkg="$PORTKEY/node_modules/@portkey-ai/gateway/package.json" have=""
    [[ -f "$pkg" ]] && have="$(node -p "require('$pkg').version" 2>/dev/null || true)"
    if [[ "$have" == "$PORTKEY_VERSION" ]]; then
        say "Portkey gateway $have already in $PORTKEY: nothing to do"
        return
    fi
    local t0=$SECONDS
    mkdir -p "$PORTKEY"
    [[ -f "$PORTKEY/package.json" ]] || echo '{"name": "bench-portkey", "private": true}' >"$PORTKEY/package.json"
    say "npm install @portkey-ai/gateway@$PORTKEY_VERSION in $PORTKEY"
    (cd "$PORTKEY" && npm install --no-audit --no-fund --loglevel=error "@portkey-ai/gateway@$PORTKEY_VERSION")
    say "Portkey gateway $PORTKEY_VERSION installed in $PORTKEY in $((SECONDS - t0))s"
}

case "${1:-all}" in
    litellm) install_litellm ;;
    portkey) install_portkey ;;
    all) install_litellm; install_portkey ;;
    *) echo "usage: $0 [all|litellm|portkey]" >&2; exit 2 ;;
esac
