"""Certificates from a private CA, made once per session."""

from __future__ import annotations

import pytest

from tests.upstream.servers import Certs, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))
