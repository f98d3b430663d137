"""Continuous-batching engine: scheduler, slot bookkeeping, and the asyncio bridge.

Design (like vLLM's engine vs. its OpenAI server): the engine knows token ids and
sampling params, never HTTP. It runs in its own thread (torch releases the GIL in
its kernels); requests arrive through a thread-safe inbox and outputs go back
through per-request asyncio queues fed with `loop.call_soon_threadsafe`.

Each iteration (1) when no prefill group is in progress, moves the oldest waiting
requests into one (as many as free decode slots and the token budget allow, at
least MIN_ROW_CHUNK prompt tokens per row per step), (2) runs at most one prompt
chunk for the group: one forward over its rows, padded to the same width, with
at most `prefill_chunk` tokens in all while others decode (`prefill_chunk_idle`
when nobody waits on us; a quarter more when that finishes the group's prompts:
LAST_CHUNK_SLACK), so a long prompt, or a burst of arrivals, costs running
streams one chunk of latency per step (chunked prefill), and (3) runs ONE batched
decode forward for every running sequence. Requests join and leave between
iterations; a finished request's slot is filled by moving the last running
sequence into it, so the decode batch is always slots 0..B-1 and the group being
prefilled sits in the slots right after, shortest prompt first: every row advances
by the same width each step, so the rows that finish their prompt are always a
prefix of the group and join the decode batch without moving.

Why our own engine and not transformers' continuous batching (`generate_batch` /
ContinuousBatchingManager): that manager has no per-request sampling params, stop
strings, per-request seeds or cancellation hook, must run outside
torch.inference_mode, and was slower than this engine in bench/local_backend_bench.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from .detokenize import IncrementalDetokenizer, StopMatcher
from .quantized import Q4Blocks
from .runner import ModelRunner
from .sampling import Sampler, SamplingParams, sample_batch
from .stats import EngineStats

if TYPE_CHECKING:
    from transformers import MistralForCausalLM

log = logging.getLogger("local_backend.engine")

#: Prompt tokens per row per step a prefill group keeps at least (it admits fewer rows
#: rather than go narrower): 16 short prompts arriving together while nobody decodes are
#: prefilled in one forward (budget 512), instead of one request per step.
MIN_ROW_CHUNK = 32
#: A group whose prompts would need one more chunk of at most 1/LAST_CHUNK_SLACK of this
#: one's width takes it in this step: a last chunk of a few tokens a row costs a whole
#: forward (with oneDNN reading every weight again) for little work. 16 chat prompts of
#: ~36 tokens arriving while one decodes: 4 steps of 4 x 36 tokens instead of 8 (4 x 32,
#: then 4 x 4, the second ~40 ms each on the 2-core box).
LAST_CHUNK_SLACK = 4


class QueueFull(Exception):
    """Admission refused: too many requests already waiting."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the local backend queue is full, retry later")
        self.retry_after = retry_after


class ContextLengthExceeded(Exception):
    """prompt + max_tokens does not fit the model's context."""


@dataclass
class EngineConfig:
    max_batch: int = 16
    max_queue: int = 64
    max_model_len: int = 2048
    prefill_chunk: int = 128  # prompt tokens per step while other streams decode
    prefill_chunk_idle: int = 512  # ...and while nobody waits on us
    threads: int | None = None  # torch intra-op threads of the engine thread (None: inherit)


@dataclass
class StepOutput:
    """What one engine step produced for one request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "error" | "timeout" | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[StepOutput], None]
    sampler: Sampler
    detok: IncrementalDetokenizer
    stops: StopMatcher
    output_ids: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose KV is in the cache
    last_token: int = 0
    finished: bool = False
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() by which it must have finished


# What other threads send to the engine thread.
_Message = tuple[Literal["add"], _Request] | tuple[Literal["abort"], int] | tuple[Literal["wake"], None]


class Engine:
    """The scheduler thread. Public methods are thread-safe."""

    def __init__(
        self,
        runner: ModelRunner,
        decode: Callable[[list[int]], str],
        eos_token_ids: frozenset[int],
        config: EngineConfig,
    ) -> None:
        if config.max_batch >= runner.max_slots:
            raise ValueError("runner needs max_batch + 1 slots (one for the prefilling request)")
        self.runner = runner
        self.decode_text = decode
        self.eos = eos_token_ids
        self.cfg = config
        self._inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._waiting: list[_Request] = []
        self._prefilling: list[_Request] = []  # slots B.. right after the running ones
        self._running: list[_Request] = []  # index == KV slot
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.started = False
        self.steps = 0
        self.stats = EngineStats()  # plain ints, read by local_backend.metrics at scrape time

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Run the loop in a new thread (tests, benchmarks, embedding)."""
        self.started = True
        self._thread = threading.Thread(target=self._loop, name="local-backend-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the loop in the calling thread until shutdown().

        The server calls this from the thread that loaded the model, so that one
        thread runs every torch op of the process: with libgomp (PyTorch's OpenMP on
        Linux wheels), every extra live OpenMP pool slows each parallel region once
        there are more OpenMP threads than cores, and a decode step runs ~1000 of them.
        """
        self.started = True
        self._loop()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[StepOutput], None],
        deadline: float | None = None,
    ) -> int:
        """Queue a request; raises ContextLengthExceeded / QueueFull synchronously.

        `deadline` (a `time.monotonic()` value): once it passes, a request that has
        started generating ends with what it has and finish_reason "length"; one still
        waiting or prefilling ends with "timeout" and no tokens. Checked before every step.
        """
        need = len(prompt_ids) + params.max_tokens
        if not prompt_ids or need > self.cfg.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you "
                f"requested {need} tokens ({len(prompt_ids)} in the messages, {params.max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion."
            )
        with self._lock:
            if self._num_waiting >= self.cfg.max_queue:
                self.stats.requests["rejected"] += 1
                raise QueueFull(retry_after=self._retry_after())
            self._num_waiting += 1
        req = _Request(
            id=next(self._ids),
            prompt_ids=list(prompt_ids),
            params=params,
            sink=sink,
            sampler=Sampler(params, prompt_ids, self.runner.device),
            detok=IncrementalDetokenizer(self.decode_text),
            stops=StopMatcher(params.stop),
            deadline=deadline,
        )
        self._inbox.put(("add", req))
        return req.id

    def abort(self, request_id: int) -> None:
        """Drop a request (client went away); its slot is freed before the next step."""
        self._inbox.put(("abort", request_id))

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def batch_size(self) -> int:
        """Unfinished sequences in the running decode batch (not counting one being prefilled).

        A sequence is marked finished before its last piece reaches the client and released
        after, so counting only unfinished ones keeps this gauge at 0 once a client has its answer.
        """
        return sum(1 for r in list(self._running) if not r.finished)

    def _retry_after(self) -> int:
        # Rough: one queue's worth of requests drains in a few seconds on this model size.
        return max(1, min(30, self._num_waiting // max(self.cfg.max_batch, 1) + 1))

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)  # OpenMP thread count is per calling thread
        self.ready.set()
        while not self._stop.is_set():
            idle = not (self._running or self._prefilling or self._waiting)
            self._drain_inbox(block=idle)
            try:
                self._expire(time.monotonic())
                self._admit()
                if self._prefilling:
                    self._prefill_step()
                if self._running:
                    self._decode_step()
                self.steps += 1
            except Exception:  # keep serving: fail what was in flight, not the process
                log.exception("engine step failed; failing in-flight requests")
                for r in self._running + self._prefilling:
                    self._emit(r, "", [], "error")
                self._running.clear()
                self._prefilling.clear()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "add":
                self._waiting.append(item[1])
            elif item[0] == "abort":
                self._abort(item[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _abort(self, request_id: int) -> None:
        for r in self._waiting:
            if r.id == request_id:
                self._waiting.remove(r)
                with self._lock:
                    self._num_waiting -= 1
                self.stats.finished("aborted")
                return
        for j, r in enumerate(self._prefilling):
            if r.id == request_id:
                self._drop_prefilling(j)
                self.stats.finished("aborted")
                return
        for i, r in enumerate(self._running):
            if r.id == request_id:
                self._release(i)
                self.stats.finished("aborted")
                return

    def _expire(self, now: float) -> None:
        """End the requests whose deadline has passed (see submit)."""
        late = [r for r in self._waiting if r.deadline is not None and r.deadline <= now]
        for r in late:
            self._waiting.remove(r)
            with self._lock:
                self._num_waiting -= 1
            self._emit(r, "", [], "timeout")
        group = self._prefilling
        for j in range(len(group) - 1, -1, -1):
            p = group[j]
            if p.deadline is not None and p.deadline <= now:
                self._drop_prefilling(j)
                self._emit(p, "", [], "timeout")
        running = self._running
        for i in range(len(running) - 1, -1, -1):
            r = running[i]
            if r.deadline is not None and r.deadline <= now:
                text, stopped = r.stops.push(r.detok.flush())
                self._emit(r, text + ("" if stopped else r.stops.flush()), [], "stop" if stopped else "length")
                self._release(i)

    def _budget(self) -> int:
        return self.cfg.prefill_chunk if self._running else self.cfg.prefill_chunk_idle

    def _admit(self) -> None:
        """Start a prefill group from the oldest waiting requests, when none is in progress."""
        if self._prefilling or not self._waiting:
            return
        k = min(self.cfg.max_batch - len(self._running), len(self._waiting), max(1, self._budget() // MIN_ROW_CHUNK))
        if k <= 0:
            return
        group = self._waiting[:k]
        del self._waiting[:k]
        with self._lock:
            self._num_waiting -= k
        group.sort(key=lambda r: len(r.prompt_ids))  # shortest first: see the module docstring
        self._prefilling = group

    def _prefill_step(self) -> None:
        group = self._prefilling
        longest = max(len(r.prompt_ids) - r.computed for r in group)
        width = min(longest, max(1, self._budget() // len(group)))
        if longest - width <= width // LAST_CHUNK_SLACK:  # see LAST_CHUNK_SLACK
            width = longest
        chunks = [r.prompt_ids[r.computed : r.computed + width] for r in group]
        logits = self.runner.prefill_rows(len(self._running), chunks, [r.computed for r in group])
        for r, c in zip(group, chunks, strict=True):
            r.computed += len(c)
        n = sum(r.computed >= len(r.prompt_ids) for r in group)
        if n == 0:
            return
        done, self._prefilling = group[:n], group[n:]
        assert all(r.computed >= len(r.prompt_ids) for r in done), "prefill rows finish in slot order"
        now = time.monotonic()
        for r, token in zip(done, sample_batch(logits[:n], [r.sampler for r in done]), strict=True):
            self.stats.first_token(now - r.arrival)
            self._running.append(r)
            self._accept(r, token)
        for i in range(len(self._running) - 1, len(self._running) - 1 - n, -1):
            if self._running[i].finished:  # EOS or max_tokens=1 at the first token
                self._release(i)

    def _drop_prefilling(self, j: int) -> None:
        """Remove row j of the prefill group, moving the rows after it down one slot."""
        group = self._prefilling
        base = len(self._running)
        for m in range(j + 1, len(group)):
            self.runner.move(base + m, base + m - 1, group[m].computed)
        del group[j]

    def _decode_step(self) -> None:
        running = self._running
        dev = self.runner.device
        tokens = torch.tensor([r.last_token for r in running], device=dev)
        positions = torch.tensor([r.computed for r in running], device=dev)
        logits = self.runner.decode(tokens, positions)
        for r in running:
            r.computed += 1
        new = sample_batch(logits, [r.sampler for r in running])
        for r, t in zip(running, new, strict=True):
            self._accept(r, t)
        for i in range(len(running) - 1, -1, -1):
            if running[i].finished:
                self._release(i)

    def _accept(self, req: _Request, token: int) -> None:
        """Record a sampled token, stream its text, decide whether the request is done."""
        p = req.params
        req.last_token = token
        if token in self.eos and not p.ignore_eos:
            text, stopped = req.stops.push(req.detok.flush())
            self._emit(req, text + ("" if stopped else req.stops.flush()), [], "stop")
            return
        req.output_ids.append(token)
        self.stats.generated_tokens += 1
        req.sampler.append(token)
        text, stopped = req.stops.push(req.detok.add(token))
        if stopped:
            self._emit(req, text, [token], "stop")
        elif len(req.output_ids) >= p.max_tokens or req.computed + 1 >= self.runner.max_len:
            text2, stopped = req.stops.push(req.detok.flush())
            tail = "" if stopped else req.stops.flush()
            self._emit(req, text + text2 + tail, [token], "stop" if stopped else "length")
        else:
            self._emit(req, text, [token], None)

    def _emit(self, req: _Request, text: str, ids: list[int], finish: str | None) -> None:
        if finish is not None:
            req.finished = True
            self.stats.finished(finish)
        req.sink(StepOutput(text, ids, finish, len(req.prompt_ids), len(req.output_ids)))

    def _release(self, index: int) -> None:
        """Free running slot `index`, keeping running sequences in slots 0..B-1."""
        running = self._running
        last = len(running) - 1
        if index != last:
            moved = running[last]
            self.runner.move(last, index, moved.computed)
            running[index] = moved
        running.pop()
        for j, p in enumerate(self._prefilling):  # the group lives just past the running slots
            self.runner.move(last + 1 + j, last + j, p.computed)


class RequestStream:
    """Async iterator over one request's StepOutputs; aborts the request if dropped early."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.request_id = 0
        self.finished = False

    def _put(self, out: StepOutput) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finish_reason is not None:
            self.finished = True
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def add_request(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None
) -> RequestStream:
    """Submit from asyncio code. Raises QueueFull / ContextLengthExceeded immediately."""
    stream = RequestStream(engine)
    stream.request_id = engine.submit(prompt_ids, params, stream._put, deadline)
    return stream


def build_engine(
    model: MistralForCausalLM,
    decode: Callable[[list[int]], str],
    eos_token_ids: frozenset[int],
    config: EngineConfig,
    q4_layers: list[dict[str, Q4Blocks]] | None = None,
    fp16_weights: bool = False,
    native_kernels: bool = False,
) -> Engine:
    """Fuse the model's weights into a runner sized for the config and wrap it in an Engine."""
    runner = ModelRunner(
        model,
        max_slots=config.max_batch + 1,
        max_len=config.max_model_len,
        q4_layers=q4_layers,
        fp16_weights=fp16_weights,
        native_kernels=native_kernels,
    )
    return Engine(runner, decode, eos_token_ids, config)
