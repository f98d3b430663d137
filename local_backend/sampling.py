"""Per-request logit processing and sampling.

Each request owns a `Sampler` (its params, its RNG, its token counts) so that a
request's output depends only on its own logits, never on who else is in the batch.
`sample_batch` keeps the common case (plain greedy rows) to one batched argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI + vLLM-style knobs. temperature == 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidParam (a ValueError naming the field) for values no sampler could honour."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be between 0 and 2"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be between -2 and 2"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be between -2 and 2"),
            ("stop", len(self.stop) <= 4 and all(self.stop), "at most 4 non-empty strings"),
            (
                "logit_bias",
                all(0 <= t < vocab_size and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                "token ids must be in the vocabulary and biases between -100 and 100",
            ),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise InvalidParam(name, f"{name} {msg}")


class InvalidParam(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class Sampler:
    """Sampling state of one request: seeded RNG, prompt tokens, generated-token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], device: torch.device) -> None:
        self.p = params
        self.device = device
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.greedy = params.temperature == 0.0 or params.top_k == 1
        self.counts: dict[int, int] = {}
        self._prompt_ids = prompt_ids
        self._seen: torch.Tensor | None = None  # prompt + generated, for repetition_penalty
        self.plain = self.greedy and not (
            params.logit_bias or params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        )

    def append(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1
        if self._seen is not None:
            self._seen = torch.cat([self._seen, torch.tensor([token], dtype=torch.long, device=self.device)])

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and bias, then (unless greedy) temperature, top-k, min-p, top-p. logits: [V] float32."""
        p = self.p
        if p.repetition_penalty != 1.0:
            if self._seen is None:
                seen = list(self._prompt_ids) + [t for t, n in self.counts.items() for _ in range(n)]
                self._seen = torch.tensor(seen, dtype=torch.long, device=self.device)
            if self._seen.numel():
                vals = logits[self._seen]
                logits = logits.clone()
                logits[self._seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=self.device)
            cnt = torch.tensor(list(self.counts.values()), device=self.device, dtype=logits.dtype)
            logits = logits.clone() if p.repetition_penalty == 1.0 else logits
            logits[ids] -= p.presence_penalty + p.frequency_penalty * cnt
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=self.device)
            bias = torch.tensor(list(p.logit_bias.values()), device=self.device, dtype=logits.dtype)
            logits = logits.index_add(0, ids, bias)
        if self.greedy:
            return logits
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.min_p > 0.0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
            logits = logits.clone()
            logits[idx[drop]] = float("-inf")
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        logits = self.process(logits)
        if self.greedy:
            return int(logits.argmax())
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row; plain greedy rows share a single argmax."""
    out = logits.argmax(-1).tolist()
    for i, s in enumerate(samplers):
        if not s.plain:
            out[i] = s.sample(logits[i])
    return out
