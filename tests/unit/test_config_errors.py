"""Config errors: every kind, a parse error or one found resolving the catalog,
is a ``ConfigError`` line ``key.path: message`` at its path in the user's file
(``models[0].endpoints[1].provider``), printed as ``file: key.path: message``."""

from __future__ import annotations

import pytest

from gateway import config as config_mod
from gateway.routing import catalog


def errors_of(tmp_path, toml: str) -> list[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(toml)
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(path)
    assert err.value.source == str(path)
    assert err.value.lines() == [f"{path}: {e}" for e in err.value.errors]
    return err.value.errors


def test_toml_syntax_error_is_located_by_line_and_column(tmp_path):
    assert errors_of(tmp_path, "[server]\nport = 8000\n[routing\n") == [
        "line 3, column 9: invalid TOML: Expected ']' at the end of a table declaration"
    ]
    assert errors_of(tmp_path, "a = [1,")[0].startswith("end of file: invalid TOML: ")


def test_unreadable_file(tmp_path):
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(tmp_path / "missing.toml")
    assert err.value.errors == ["(file): cannot read: No such file or directory"]
    (tmp_path / "latin1.toml").write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.load(tmp_path / "latin1.toml")
    assert err.value.errors == ["(file): not UTF-8 text (byte 20)"]


def test_unknown_section_suggests_the_near_one_and_unknown_fields_have_their_own_path(tmp_path):
    errors = errors_of(tmp_path, '[sever]\nport = 1\n[routing]\nmax_atempts = 3\n[[models]]\nid = "m"\nkind2 = 1\n')
    assert errors == [
        "sever: unknown section (did you mean [server]?)",
        "routing.max_atempts: unknown field",
        "models[0].kind2: unknown field",
    ]
    assert errors_of(tmp_path, "[zzz]\n") == ["zzz: unknown section"]


def test_schema_and_type_errors_name_the_key(tmp_path):
    errors = errors_of(
        tmp_path,
        '[server]\nport = "eighty"\n'
        '[[models]]\nid = "a/b"\n[[models.endpoints]]\nprovider = 3\n'
        '[[models]]\nid = "c/d"\n[[models.endpoints]]\nprovider = "novita"\ncontext_length = 0\n'
        "[providers.novita]\ntimeout_s = -1\n",
    )
    assert errors == [
        "server.port: Expected `int`, got `str`",
        "models[0].endpoints[0].provider: Expected `str`, got `int`",
        "models[1].endpoints[0].context_length: Expected `int` >= 1",
        "providers.novita.timeout_s: Expected `float` > 0.0",
    ]


def test_bad_url(tmp_path):
    assert errors_of(tmp_path, '[providers.acme]\nbase_url = "ftp://acme.example/v1"\n') == [
        "providers.acme.base_url: 'ftp://acme.example/v1' must be an http:// or https:// URL"
    ]


def test_catalog_references_are_checked_at_their_path_in_the_users_file(tmp_path):
    errors = errors_of(
        tmp_path,
        # models[0]: a new model; its second endpoint names a provider that exists nowhere.
        '[[models]]\nid = "acme/m"\n'
        '[[models.endpoints]]\nprovider = "acme"\ncontext_length = 100\n'
        '[[models.endpoints]]\nprovider = "nowhere"\ncontext_length = 100\n'
        # models[1]: a built-in model, merged: deepinfra's endpoint is built in (context
        # length and all), novita's is new and has no context length.
        '[[models]]\nid = "MISTRALAI/Mistral-Nemo"\n'
        '[[models.endpoints]]\nprovider = "deepinfra"\ninput_usd_per_mtok = 0.01\n'
        '[[models.endpoints]]\nprovider = "novita"\n'
        # a new provider without base_url.
        "[providers.acme]\ntimeout_s = 5\n",
    )
    assert errors[0] == "providers.acme.base_url: required (the built-in catalog has no provider 'acme')"
    assert errors[1].startswith("models[0].endpoints[1].provider: unknown provider 'nowhere' (known: acme, ")
    assert errors[2] == (
        "models[1].endpoints[1].context_length: required (the built-in catalog has no endpoint of "
        "'MISTRALAI/Mistral-Nemo' on 'novita' to take it from)"
    )
    assert len(errors) == 3


def test_a_file_that_loads_builds_its_catalog(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[providers.acme]\nbase_url = "http://127.0.0.1:1/v1"\n'
        '[[models]]\nid = "acme/m"\n[[models.endpoints]]\nprovider = "acme"\ncontext_length = 100\n'
        '[[models]]\nid = "mistralai/mistral-nemo"\n[[models.endpoints]]\nprovider = "deepinfra"\n'
    )
    built = catalog.build(config_mod.load(path), env={})
    assert built.find("acme/m").endpoints[0].provider.name == "acme"
    assert built.find("mistralai/mistral-nemo").endpoints[0].context_length == 131072


def test_catalog_of_a_config_made_in_code_names_the_effective_config():
    """What ``config.load`` rules out can still reach ``catalog.build`` from a
    config built in code: same style, indices into that config."""
    base = config_mod.builtin()
    cfg = config_mod.parse(
        {
            "providers": {"acme": {"timeout_s": 3.0}},
            "models": [
                {"id": "x/one", "endpoints": [{"provider": "nowhere", "context_length": 5}]},
                {"id": "x/two", "endpoints": [{"provider": "acme", "context_length": 5}, {"provider": "novita"}]},
            ],
        }
    )
    merged = config_mod.merge(base, cfg, {})
    n = len(base.models)
    with pytest.raises(config_mod.ConfigError) as err:
        catalog.build(merged, env={})
    assert err.value.source == catalog.EFFECTIVE
    assert err.value.errors == [
        "providers.acme.base_url: required",
        f"models[{n}].endpoints[0].provider: unknown provider 'nowhere' (model 'x/one')",
        f"models[{n + 1}].endpoints[1].context_length: required (model 'x/two')",
    ]


def test_local_dtype_is_one_of_the_backends(tmp_path):
    """A value outside a choice lists the choices, at any depth."""
    assert errors_of(tmp_path, '[local]\ndtype = "bf16"\n') == [
        "local.dtype: Invalid enum value 'bf16' (expected one of 'auto', 'float32', 'bfloat16')"
    ]
    sha = "0" * 64
    assert errors_of(tmp_path, f'[[auth.keys]]\nname = "a"\nsha256 = "{sha}"\nsafety = {{ mode = "blok" }}\n') == [
        "auth.keys[0].safety.mode: Invalid enum value 'blok' (expected one of 'annotate', 'block')"
    ]
