"""`python -m local_backend serve ...`: argument parsing and process wiring."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Backend

MAX_DEFAULT_CONTEXT = 8192
#: max_tokens of a request that sets none. At the slowest single-stream rate measured on
#: a 2-core CPU (13 tok/s: AVX2-only EPYC, fp32, before the packed fp32 GEMMs) 256 tokens
#: take ~20 s, inside the 30 s a first answer may take; the gateway's [local]
#: default_max_tokens (1..1024) is passed here.
DEFAULT_MAX_TOKENS = 256
#: A non-streamed request ends with what it has generated (finish_reason "length") this
#: long after it arrived, so a client (or the gateway, whose default deadline is 120 s)
#: gets an answer instead of a timeout. 0 turns it off.
DEFAULT_REQUEST_TIMEOUT_S = 100.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m local_backend")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a Mistral-family model over OpenAI-compatible HTTP")
    s.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), a local HF directory, or a hub id"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    s.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: bfloat16 on cuda and on CPUs with AVX512-BF16/AMX, else float32",
    )
    s.add_argument("--served-name", default=None, help="model name clients must send")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    s.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"context length (default: the model's, capped at {MAX_DEFAULT_CONTEXT})",
    )
    s.add_argument("--tokenizer", default=None, help="mistral-common tokenizer file (tokenizer.model.v3, tekken.json)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    s.add_argument(
        "--default-max-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOKENS,
        help=f"max_tokens of a request that sets none (default {DEFAULT_MAX_TOKENS}; the context still bounds it)",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds after which a non-streamed request ends with what it has, finish_reason "
        f"'length' (default {DEFAULT_REQUEST_TIMEOUT_S:g}; 0 = none); an X-Request-Timeout header may lower it",
    )
    s.add_argument(
        "--int4",
        choices=["auto", "off"],
        default="auto",
        help="auto: the embedded model on a CPU decodes from the GGUF's own 4-bit weights (in bf16 "
        "batches of up to 16 rows on the native kernels' q4_matmul where the CPU has AVX512-BF16, else up "
        "to 4; in fp32 only with --fp16-weights off: up to 16 rows, whose GEMM inputs are then rounded "
        "to bf16); off: never",
    )
    s.add_argument(
        "--int4-max-rows",
        type=_rows,
        default=None,
        help="the most token rows a forward runs on the 4-bit weights (0-64); default: the "
        "measured crossover (16 rows on q4_matmul, else 4 in bf16 and 16 in fp32), lowered at "
        "start where the packed GEMMs are clearly faster on this CPU",
    )
    s.add_argument(
        "--fp16-weights",
        choices=["auto", "off"],
        default="auto",
        help="auto: the embedded model in fp32 on an x86 CPU (FBGEMM) keeps its weights in fp16 and "
        "runs every GEMM on them with fp32 activations; off: fp32 weights",
    )
    s.add_argument(
        "--native-kernels",
        choices=["auto", "off"],
        default="auto",
        help="auto: on a CPU with a C compiler (cc, or $CC), build C kernels at start (cached): the "
        "decode step's RoPE and K/V write and attention, every RMSNorm and SiLU, and on AVX512-BF16 "
        "bf16's 4-bit GEMM; off: torch's ops only",
    )
    s.add_argument("--log-level", default="info")
    b = sub.add_parser(
        "build-kernels",
        help="compile the native kernels for each x86-64 level (v3, v4, v4 with AVX512-BF16, and with AMX), for "
        "machines with no C compiler at run time; serve picks the best one the CPU runs",
    )
    b.add_argument("--dir", type=Path, default=None, help="where serve looks (default: the model cache's kernels/)")
    b.add_argument("--log-level", default="info")
    return ap.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _rows(text: str) -> int:
    from .native import Q4_MAX_ROWS  # q4_matmul's limit (torch's int4 kernel has none)

    value = int(text)
    if not 0 <= value <= Q4_MAX_ROWS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {Q4_MAX_ROWS}")
    return value


def make_loader(
    model: str,
    device: str = "cpu",
    dtype: str | None = None,
    tokenizer: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_model_len: int | None = None,
    threads: int | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
    int4: bool = True,
    fp16: bool = True,
    native_kernels: bool = True,
    int4_max_rows: int | None = None,
) -> Callable[[], Backend]:
    """The start-up work the server runs in a thread: load, fuse, warm up.

    The Backend's engine is returned unstarted: the server then runs its loop in this
    same thread (`Engine.run`), so one thread owns every torch op (see Engine.run).
    """
    from .engine import EngineConfig, build_engine
    from .models import load_model
    from .server import Backend

    def load() -> Backend:
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)  # per thread under OpenMP: set it here
        lm = load_model(model, device=device, dtype=dtype, tokenizer=tokenizer, int4=int4, fp16=fp16)
        max_len = max_model_len or min(lm.max_model_len, MAX_DEFAULT_CONTEXT)
        cfg = EngineConfig(max_batch=max_batch, max_queue=max_queue, max_model_len=max_len)
        vocab = lm.model.config.vocab_size
        engine = build_engine(
            lm.model,
            lm.tokenizer.decode,
            lm.tokenizer.eos_token_ids,
            cfg,
            lm.q4_layers,
            lm.fp16_weights,
            native_kernels=native_kernels,
        )
        if int4_max_rows is not None:
            engine.runner.int4_max_rows = int4_max_rows  # the operator's, as asked
        else:
            engine.runner.check_crossover()  # this CPU's, where it differs clearly
        engine.runner.prefill(0, [0] * 8, 0)  # warm up kernels before reporting ready
        engine.runner.prefill(0, [0], 0)  # ...and the int4 ones, if any (one row)
        return Backend(
            engine=engine,
            tokenizer=lm.tokenizer,
            vocab_size=vocab,
            defaults=lm.generation_defaults,
            default_max_tokens=default_max_tokens,
            request_timeout_s=request_timeout_s or None,
        )

    return load


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .models import default_served_name
    from .server import create_app

    # No torch work in this (the uvicorn) thread: the loader thread loads and then runs the engine.
    served = args.served_name or default_served_name(args.model)
    load = make_loader(
        args.model,
        args.device,
        args.dtype,
        args.tokenizer,
        args.max_batch,
        args.max_queue,
        args.max_model_len,
        args.threads,
        args.default_max_tokens,
        args.request_timeout,
        int4=args.int4 == "auto",
        fp16=args.fp16_weights == "auto",
        native_kernels=args.native_kernels == "auto",
        int4_max_rows=args.int4_max_rows,
    )
    app = create_app(served, load)
    logging.getLogger("local_backend").info(
        "listening on http://%s:%d (model %s, served as %r; /health is 503 until loaded)",
        args.host,
        args.port,
        args.model,
        served,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        serve(args)
    elif args.command == "build-kernels":
        return build_kernels(args.dir)
    return 0


def build_kernels(directory: Path | None) -> int:
    from .models import cache_root
    from .native import prebuild

    try:
        for path in prebuild(directory or cache_root() / "kernels"):
            print(path)
    except RuntimeError as e:
        print(f"build-kernels: {e}", file=sys.stderr)
        return 1
    return 0
