"""nginx in front of the gateways: `nginx -t` on the config, and SSE-friendly proxying."""

from __future__ import annotations

import re
import socket
import subprocess

from ._support import DEPLOY, tool

CONF = DEPLOY / "nginx" / "nginx.conf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _testable(conf: str, tmp) -> str:
    """The config with what `nginx -t` would need from the compose network
    replaced: upstream host names resolve (127.0.0.1), the listen port is free
    and unprivileged, temp files go under the prefix."""
    conf, n = re.subn(r"(^\s*server\s+)[A-Za-z][\w.-]*(:\d+)", r"\g<1>127.0.0.1\2", conf, flags=re.M)
    assert n >= 2, "expected the gateway replicas as upstream servers"
    conf = re.sub(r"(^\s*listen\s+)\d+\s*;", rf"\g<1>127.0.0.1:{_free_port()};", conf, flags=re.M)
    temp = "".join(f"    {d}_temp_path {tmp}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return re.sub(r"^http\s*\{\n", lambda m: m.group(0) + temp, conf, count=1, flags=re.M)


def _nginx_t(text: str, tmp) -> subprocess.CompletedProcess:
    nginx = tool("nginx", "/usr/sbin/nginx", apt="nginx")
    conf = tmp / "nginx.conf"
    conf.write_text(_testable(text, tmp))
    return subprocess.run(
        [nginx, "-t", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"), "-g", f"pid {tmp}/nginx.pid;"],
        capture_output=True, text=True, timeout=60,
    )


def test_nginx_t(tmp_path):
    r = _nginx_t(CONF.read_text(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test is successful" in r.stderr


def test_nginx_t_catches_a_broken_config(tmp_path):
    """The check above is not vacuous: a typo in the same file fails it."""
    r = _nginx_t(CONF.read_text().replace("proxy_buffering off;", "proxy_buffering of;"), tmp_path)
    assert r.returncode != 0 and "proxy_buffering" in r.stderr, r.stderr


def _location(conf: str, name: str) -> str:
    m = re.search(r"location\s+" + re.escape(name) + r"\s*\{(.*?)\n\s*\}", conf, re.S)
    assert m, f"no location {name}"
    return m.group(1)


def test_proxying_is_sse_friendly():
    conf = CONF.read_text()
    upstream = re.search(r"upstream\s+gateway\s*\{(.*?)\}", conf, re.S).group(1)
    assert re.search(r"^\s*keepalive\s+\d+;", upstream, re.M), "upstream keepalive connections"
    loc = _location(conf, "/")
    for directive in ("proxy_pass http://gateway;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                      "proxy_buffering off;", "proxy_cache off;"):
        assert directive in loc, f"location / lacks `{directive}`"
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", loc)
    assert read_timeout and int(read_timeout.group(1)) >= 120, "streams outlive the default 60 s read timeout"
    # A POST that reached a gateway is never replayed on another one.
    assert "non_idempotent" not in loc
