"""Config values that end up in an HTTP head are checked at load.

A header, model id, base URL or proxy that could not be sent (or that would
split the head) is a ConfigError naming its key path, never a 500 at request
time.
"""

from __future__ import annotations

import tomllib

import pytest

from gateway import config as config_mod


def errors_of(toml: str) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(tomllib.loads(toml))
    return err.value.errors


def provider(**fields: str) -> str:
    body = "\n".join(f"{k} = {v}" for k, v in fields.items())
    return f"[providers.acme]\n{body}\n"


@pytest.mark.parametrize(
    "headers,path",
    [
        ('{ "X Title" = "a" }', "providers.acme.headers.'X Title'"),
        ('{ "X-Title:" = "a" }', "providers.acme.headers.'X-Title:'"),
        ('{ "" = "a" }', "providers.acme.headers.''"),
        ('{ "X-Caf\u00e9" = "a" }', "providers.acme.headers.'X-Caf\u00e9'"),
        ('{ "X-Title" = "line\\r\\nInjected: yes" }', "providers.acme.headers.X-Title"),
        ('{ "X-Title" = "nul\\u0000byte" }', "providers.acme.headers.X-Title"),
        ('{ "X-Title" = "bell\\u0007" }', "providers.acme.headers.X-Title"),
        ('{ "X-Title" = "del\\u007f" }', "providers.acme.headers.X-Title"),
        ('{ "X-Title" = "caf\u00e9" }', "providers.acme.headers.X-Title"),
        ('{ "X-Title" = "snow \u2603" }', "providers.acme.headers.X-Title"),
    ],
)
def test_bad_header_names_and_values_are_refused(headers, path):
    errors = errors_of(provider(base_url='"https://acme.example/v1"', headers=headers))
    assert len(errors) == 1 and errors[0].startswith(path + ":"), errors


def test_good_headers_pass():
    cfg = config_mod.parse(tomllib.loads(provider(
        base_url='"https://acme.example/v1"',
        headers='{ "HTTP-Referer" = "https://x.example/a?b=c", "X-Title" = "My app\\t(v2)", "x_y.z~!" = "" }',
    )))
    assert cfg.providers["acme"].headers["X-Title"] == "My app\t(v2)"


@pytest.mark.parametrize(
    "url",
    ['"ftp://acme.example/v1"', '"acme.example/v1"', '"https:///v1"', '"https://acme example/v1"',
     '"https://acme.example/v1\\n"', '"https://acme.example:99999/v1"', '"https://[::1/v1"',
     '"https://\u00e4cme.example/v1"', '""'],
)
def test_bad_base_urls_are_refused(url):
    errors = errors_of(provider(base_url=url))
    assert len(errors) == 1 and errors[0].startswith("providers.acme.base_url:"), errors


@pytest.mark.parametrize("proxy", ['"socks5://p:1080"', '"http://"', '"p.example:3128"', '"http://p .example"'])
def test_bad_proxies_are_refused(proxy):
    errors = errors_of(provider(base_url='"https://acme.example/v1"', proxy=proxy))
    assert len(errors) == 1 and errors[0].startswith("providers.acme.proxy:"), errors


@pytest.mark.parametrize("proxy", ['""', '"http://user:pass@proxy.example:3128"', '"https://proxy.example"'])
def test_good_proxies_pass(proxy):
    config_mod.parse(tomllib.loads(provider(base_url='"http://10.0.0.5:8000/v1"', proxy=proxy)))


@pytest.mark.parametrize(
    "model,path",
    [
        ('id = "acme/caf\u00e9"', "models[0].id"),
        ('id = "acme model"', "models[0].id"),
        ('id = "acme/m\\n"', "models[0].id"),
        ('id = ""', "models[0].id"),
        ('id = "acme/m"\naliases = ["ok", "not ok"]', "models[0].aliases[1]"),
        ('id = "acme/m"\naliases = ["\u00fcber"]', "models[0].aliases[0]"),
    ],
)
def test_bad_model_ids_and_aliases_are_refused(model, path):
    errors = errors_of(f"[[models]]\n{model}\n")
    assert len(errors) == 1 and errors[0].startswith(path + ":"), errors


def test_provider_names_go_in_headers_too():
    errors = errors_of('[providers."acm\u00e9"]\nbase_url = "https://acme.example/v1"\n')
    assert errors and errors[0].startswith("providers.acm\u00e9:"), errors


def test_every_problem_is_reported_at_once():
    errors = errors_of(
        provider(base_url='"ftp://x"', headers='{ "A B" = "c\\r" }', proxy='"socks5://p"')
        + '[[models]]\nid = "a b"\naliases = ["c d"]\n'
    )
    assert len(errors) == 6, errors


def test_builtin_catalog_and_example_config_pass(tmp_path):
    config_mod.builtin()
    config_mod.load("deploy/gateway.example.toml")


# --- Redis URL options ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url,problem",
    [
        ("rediss://r.example:6380/0?ssl_cert_reqs=none&health_check_interval=5",
         "unsupported option(s) health_check_interval"),
        ("redis://r.example/0?socket_keepalive=true", "unsupported option(s) socket_keepalive"),
        ("unix:///run/redis.sock?db=1&password=x", "unsupported option(s) password"),
        ("rediss://r.example?ssl_cert_reqs=optional", "ssl_cert_reqs must be none or required"),
        ("redis://r.example?ssl_cert_reqs=none", "ssl_cert_reqs needs a rediss:// URL"),
        ("redis://r.example/1?db=2", "in the path or as db=, not both"),
        ("redis://r.example/one", "the database must be a number"),
        ("unix:///run/redis.sock?db=x", "the database must be a number"),
        ("rediss://r.example?ssl_cert_reqs=none&ssl_cert_reqs=required", "more than once"),
        ("memcached://r.example", "unsupported scheme"),
    ],
)
def test_redis_url_options_the_client_does_not_implement_are_config_errors(url, problem):
    from gateway.storage.resp import RespClient

    errors = errors_of(f'[redis]\nurl = "{url}"\n')
    assert len(errors) == 1 and errors[0].startswith("redis.url: ") and problem in errors[0], errors
    if problem != "unsupported scheme":
        with pytest.raises(config_mod.ConfigError) as err:
            RespClient(url, 1.0)  # the client refuses them too, at start-up
        assert problem in err.value.errors[0]
    if "unsupported option" in problem:
        assert "supported: db" in errors[0] and "ssl_cert_reqs" in errors[0] and "ssl_ca_certs" in errors[0]


@pytest.mark.parametrize(
    "url",
    ["redis://r.example:6379/0", "redis://u:p@r.example/3", "redis://r.example?db=4", "unix:///run/r.sock?db=2",
     "rediss://r.example?ssl_cert_reqs=none", "rediss://r.example?ssl_cert_reqs=required",
     "redis+cluster://a:7000?read_from_replicas=true", "redis+sentinel://a:26379,b:26379/mymaster"],
)
def test_supported_redis_urls_pass(url):
    config_mod.parse(tomllib.loads(f'[redis]\nurl = "{url}"\n'))


def test_unreadable_ca_file_is_a_config_error():
    from gateway.storage.resp import RespClient

    with pytest.raises(config_mod.ConfigError) as err:
        RespClient("rediss://127.0.0.1:1?ssl_ca_certs=/nonexistent/ca.pem", 1.0)
    assert "ssl_ca_certs" in err.value.errors[0]


class _TlsFront:
    """A TLS listener in front of the test Redis: rediss:// against the real server."""

    def __init__(self, redis_port: int, context) -> None:
        self.redis_port = redis_port
        self.context = context
        self.server = None

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer) -> None:
        import asyncio

        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def __aenter__(self) -> int:
        import asyncio

        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        self.server.close()


@pytest.fixture
def tls_ca(tmp_path):
    import ssl

    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, str(ca_file)


async def test_rediss_options_reach_the_real_redis(redis_server, tls_ca):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from gateway.storage.resp import RespClient

    server_context, ca_file = tls_ca
    async with _TlsFront(redis_server.port, server_context) as port:
        for url in (f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none",  # a CA the system does not trust
                    f"rediss://localhost:{port}/0?ssl_ca_certs={ca_file}",
                    f"rediss://127.0.0.1:{port}?ssl_ca_certs={ca_file}&ssl_cert_reqs=required&db=0"):
            client = RespClient(url, 2.0)
            try:
                assert await client.ping(), url
            finally:
                await client.aclose()
        client = RespClient(f"rediss://127.0.0.1:{port}/0", 2.0)  # verified against the system's CAs: refused
        try:
            with pytest.raises(RedisConnectionError):
                await client.ping()
        finally:
            await client.aclose()


async def test_db_as_a_query_option_selects_it(redis_server):
    import redis

    from gateway.storage.resp import RespClient

    client = RespClient(f"redis://127.0.0.1:{redis_server.port}?db=5", 2.0)
    try:
        (ok,) = await client.execute([("SET", "gw-test:db-query", "five")])
    finally:
        await client.aclose()
    assert ok in (b"OK", "OK")
    there = redis.Redis(host="127.0.0.1", port=redis_server.port, db=5)
    db0 = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0)
    try:
        assert there.get("gw-test:db-query") == b"five" and db0.get("gw-test:db-query") is None
    finally:
        there.delete("gw-test:db-query")
        there.close()
        db0.close()
