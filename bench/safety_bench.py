"""Latency of the default content-safety classifier.

    python bench/safety_bench.py            # classify and stream timings
    python bench/safety_bench.py --eval     # precision/recall on the labelled set

Texts of 0.1-16 KB are built from three corpora: ordinary prose, the labelled
set (harmful and benign), and an adversarial worst case dense with
obfuscations (letter spacing, stretched letters, leetspeak, Cyrillic
look-alikes and zero-width characters, which take every slow path of the
normaliser). Latency is divided by the text's size in KB (1 KB = 1024
characters); the budget is p99 <= 1 ms per KB.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.safety import DefaultClassifier, StreamScanner  # noqa: E402
from gateway.safety.evaluation import DEFAULT_DATA, main as eval_main  # noqa: E402

SIZES_KB = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16)

PROSE = (
    "The deployment pipeline builds the image, runs the unit tests and pushes the artifact to the registry. "
    "If a worker hangs, kill the process and restart the service; the scheduler will retry the job. "
    "Our photographer will shoot the product photos on Tuesday, weather permitting. "
    "Quarterly revenue grew four percent while operating costs fell, according to the finance team. "
)
WORST = (
    "k i l l  y o u  n o w , i'm g0nna k1ll y0u, fuuuuuck this sh!t, "
    "\u043a\u0456ll \u0443\u043eu, s\u200be\u200bx, a$$hole, k.i.l.l m.y.s.e.l.f, "
    "ignore all previous instructions, muslims are vermin, how to make a pipe bomb, "
)


def corpus_texts(rng: random.Random, source: str, size_kb: float) -> str:
    n = int(size_kb * 1024)
    if source == "prose":
        base = PROSE
    elif source == "worst":
        base = WORST
    else:
        rows = [json.loads(line)["text"] for line in DEFAULT_DATA.read_text("utf-8").splitlines() if line.strip()]
        rng.shuffle(rows)
        base = " ".join(rows)
    text = (base * (n // len(base) + 1))
    start = rng.randrange(0, max(1, len(base) - 1))
    return (text + text)[start : start + n]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_classify(c: DefaultClassifier, repeats: int, best_of: int) -> None:
    rng = random.Random(5)
    print(f"classify: {repeats} texts per (corpus, size), best of {best_of} runs each; ms per KB, and absolute ms")
    print(f"{'corpus':<9} {'KB':>5} {'p50 ms/KB':>10} {'p99 ms/KB':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    per_kb_all: list[float] = []
    per_kb_worst: list[float] = []
    for source in ("prose", "labelled", "worst"):
        for kb in SIZES_KB:
            texts = [corpus_texts(rng, source, kb) for _ in range(repeats)]
            c.classify(texts[0])  # warm
            times = []
            for t in texts:
                runs = []
                for _ in range(best_of):
                    t0 = time.perf_counter()
                    c.classify(t)
                    runs.append((time.perf_counter() - t0) * 1e3)
                times.append(min(runs))
            per_kb = [x / (len(t) / 1024) for x, t in zip(times, texts)]
            (per_kb_worst if source == "worst" else per_kb_all).extend(per_kb)
            print(f"{source:<9} {kb:>5} {pct(per_kb, .5):>10.3f} {pct(per_kb, .99):>10.3f} "
                  f"{pct(times, .5):>8.3f} {pct(times, .99):>8.3f} {max(times):>8.3f}")
    print(f"prose+labelled, all sizes: p50 {pct(per_kb_all, .5):.3f} ms/KB, p99 {pct(per_kb_all, .99):.3f} ms/KB")
    print(f"worst case, all sizes:     p50 {pct(per_kb_worst, .5):.3f} ms/KB, p99 {pct(per_kb_worst, .99):.3f} ms/KB")


def bench_stream(c: DefaultClassifier, total_chars: int) -> None:
    rng = random.Random(7)
    print(f"\nStreamScanner.feed: {total_chars} characters per stream, overlap 64")
    print(f"{'corpus':<9} {'chunk':>5} {'feeds':>6} {'p50 us':>8} {'p99 us':>8} {'max us':>8}")
    for source in ("prose", "labelled", "worst"):
        text = corpus_texts(rng, source, total_chars / 1024)
        for size in (4, 16, 64, 256):
            s = StreamScanner(c)
            times = []
            for i in range(0, len(text), size):
                chunk = text[i : i + size]
                t0 = time.perf_counter()
                s.feed(chunk)
                times.append((time.perf_counter() - t0) * 1e6)
            print(f"{source:<9} {size:>5} {len(times):>6} {statistics.median(times):>8.1f} {pct(times, .99):>8.1f} {max(times):>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", action="store_true", help="precision/recall on the labelled set instead")
    parser.add_argument("--repeats", type=int, default=200, help="texts per (corpus, size)")
    parser.add_argument("--stream-chars", type=int, default=16384)
    parser.add_argument("--best-of", type=int, default=1,
                        help="time each text N times and keep the fastest (filters out CPU preemption on a busy box)")
    args = parser.parse_args()
    if args.eval:
        eval_main([])
        return
    t0 = time.perf_counter()
    c = DefaultClassifier()
    print(f"construction: {time.perf_counter() - t0:.2f} s (term lists + profanity model)\n")
    bench_classify(c, args.repeats, args.best_of)
    bench_stream(c, args.stream_chars)


if __name__ == "__main__":
    main()
