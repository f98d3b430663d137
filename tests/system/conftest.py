from tests.e2e.conftest import _reset_fakes, fakes, start_gateway  # noqa: F401 - shared fixtures
