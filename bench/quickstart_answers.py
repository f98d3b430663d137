"""What the embedded model answers to the README's quick-start question, at its default sampling.

    python bench/quickstart_answers.py [--answers 100] [--dtypes float32,bfloat16]

Issue 16 asks for "Paris" in at least 15 of 20 quick-start answers with the sampling
defaults (the model card's temperature 0.2 and top_p 0.9). This prints, per dtype and
per prompt (the README's messages, a system message and the question, and the bare
question without the system message), the first token's distribution at temperature 1
and at the default temperature (transformers' own forward, the same weights) and then
how many of N answers from the engine mention Paris, with the answers' openings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from local_backend.engine import Engine, EngineConfig, add_request, build_engine
from local_backend.models import CPU_FEATURES, LoadedModel, cpu_info, load_model
from local_backend.sampling import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
#: The README quick start's messages (tests/e2e/test_quickstart_e2e.py runs the README itself).
PROMPTS = {
    "README (system + question)": [{"role": "system", "content": "Answer in one sentence."}, *QUESTION],
    "bare question": QUESTION,
}


def first_token(lm: LoadedModel, prompt: list[int], temperature: float) -> str:
    tok = lm.tokenizer.tok  # type: ignore[attr-defined]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt])).logits[0, -1].float()
    top = torch.topk(torch.softmax(logits / temperature, -1), 4)
    return ", ".join(f"{tok.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(top.values, top.indices, strict=True))


async def answers(engine: Engine, prompt: list[int], params: SamplingParams, n: int) -> list[str]:
    async def one() -> str:
        return "".join([out.text async for out in add_request(engine, prompt, params)])

    texts: list[str] = []
    for start in range(0, n, 16):  # the engine's batch
        texts += await asyncio.gather(*[one() for _ in range(min(16, n - start))])
    return texts


def run(dtype: str, n: int) -> None:
    box: dict[str, object] = {}

    def load_and_serve() -> None:  # one thread runs every torch op, as in the server
        lm = load_model("embedded", dtype=dtype)
        tok = lm.tokenizer
        prompts = {label: tok.encode_chat(messages) for label, messages in PROMPTS.items()}
        t = lm.generation_defaults.temperature or 1
        box["report"] = {label: (first_token(lm, p, 1.0), first_token(lm, p, t)) for label, p in prompts.items()}
        engine = build_engine(lm.model, tok.decode, tok.eos_token_ids, EngineConfig(max_model_len=2048),
                              lm.q4_layers, lm.fp16_weights, native_kernels=True)  # as the server runs
        box.update(engine=engine, prompts=prompts, defaults=lm.generation_defaults)
        engine.run()

    thread = threading.Thread(target=load_and_serve, daemon=True)
    thread.start()
    while "engine" not in box:
        time.sleep(0.1)
    d = box["defaults"]
    params = SamplingParams(max_tokens=256, temperature=d.temperature, top_p=d.top_p)  # type: ignore[attr-defined]
    engine: Engine = box["engine"]  # type: ignore[assignment]
    print(f"{dtype}: defaults {d}")
    for label, prompt in box["prompts"].items():  # type: ignore[attr-defined]
        texts = asyncio.run(answers(engine, prompt, params, n))
        at_one, at_default = box["report"][label]  # type: ignore[index]
        openings = Counter(t[:16] for t in texts).most_common(4)
        print(f"  {label}, {len(prompt)} prompt tokens")
        print(f"    first token at temperature 1: {at_one}")
        print(f"    first token at temperature {params.temperature}: {at_default}")
        print(f"    Paris in {sum('Paris' in t for t in texts)} of {n} answers; openings: {openings}")
    engine.shutdown()
    thread.join(timeout=30)  # a torch thread still running at exit aborts the interpreter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=100)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    name, flags = cpu_info()
    print(f"CPU: {name}; " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FEATURES))
    for dtype in args.dtypes.split(","):
        run(dtype, args.answers)


if __name__ == "__main__":
    main()
