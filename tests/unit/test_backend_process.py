"""The local backend child's command line, as the backend itself parses it."""

from __future__ import annotations

from gateway.config import LocalConfig
from gateway.server.backend_process import LocalBackendProcess
from local_backend.cli import parse_args


def parsed(local: LocalConfig):
    cmd = LocalBackendProcess(local, "smollm2-135m-instruct").command()
    assert cmd[1:4] == ["-m", "local_backend", "serve"]
    return parse_args(cmd[3:])


def test_dtype_auto_leaves_the_choice_to_the_backend() -> None:
    """`auto` (the default) passes no --dtype: the backend picks bf16 where the CPU has it natively."""
    assert LocalConfig().dtype == "auto"
    args = parsed(LocalConfig())
    assert args.dtype is None
    assert (args.model, args.device, args.served_name, args.default_max_tokens) == (
        "embedded",
        "cpu",
        "smollm2-135m-instruct",
        256,
    )


def test_an_explicit_dtype_is_passed_through() -> None:
    assert parsed(LocalConfig(dtype="float32")).dtype == "float32"
    assert parsed(LocalConfig(dtype="bfloat16", default_max_tokens=64)).default_max_tokens == 64
    assert parsed(LocalConfig(dtype="bfloat16")).dtype == "bfloat16"
