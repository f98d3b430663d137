"""Precision/recall of the default classifier on a labelled set.

    python -m gateway.safety.evaluation [--data PATH] [--split tune|heldout|all] [--errors]

(Not ``gateway.safety.evaluate``: a submodule of that name would shadow the
``evaluate`` policy function exported by the package.)

A text counts as flagged for a severity category at "medium" or above (the
Azure default blocking level; "low" is an annotation only) and for jailbreak
and profanity when detected. The false-positive rate is the share of benign
texts (no labels) flagged in any category. Each row of the JSONL file is
``{"text": ..., "labels": [...], "split": "tune"|"heldout"}``; rules were
tuned on ``tune`` only, ``heldout`` measures how that generalises.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from gateway.protocol import ContentFilterResults
from gateway.safety.classifier import DefaultClassifier
from gateway.safety.lexicon import CATEGORIES, DETECTION_CATEGORIES, RANK

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "tests" / "safety" / "data" / "labelled.jsonl"


class Row(TypedDict):
    """One labelled text: its categories (none when benign) and its split."""

    text: str
    labels: list[str]
    split: str


def flagged(results: ContentFilterResults, min_level: str = "medium") -> set[str]:
    """Categories counted as positive predictions."""
    out: set[str] = set()
    for name in CATEGORIES:
        value = getattr(results, name)
        if name in DETECTION_CATEGORIES:
            if value.detected:
                out.add(name)
        elif RANK[value.severity] >= RANK[min_level]:
            out.add(name)
    return out


@dataclass
class Report:
    n: int = 0
    benign: int = 0
    benign_flagged: int = 0
    benign_low: int = 0  # benign texts with some category at "low" (not counted as FP)
    tp: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    fp: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    fn: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    errors: list[tuple[str, list[str], list[str]]] = field(default_factory=list)

    def precision(self, c: str) -> float:
        d = self.tp[c] + self.fp[c]
        return self.tp[c] / d if d else 1.0

    def recall(self, c: str) -> float:
        d = self.tp[c] + self.fn[c]
        return self.tp[c] / d if d else 1.0

    @property
    def fp_rate(self) -> float:
        return self.benign_flagged / self.benign if self.benign else 0.0


def load_rows(path: Path = DEFAULT_DATA, split: str = "all") -> list[Row]:
    rows: list[Row] = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return [r for r in rows if split == "all" or r["split"] == split]


def run(classifier: DefaultClassifier, rows: list[Row]) -> Report:
    rep = Report()
    for row in rows:
        results = classifier.classify(row["text"])
        pred, gold = flagged(results), set(row["labels"])
        rep.n += 1
        if not gold:
            rep.benign += 1
            rep.benign_flagged += bool(pred)
            rep.benign_low += bool(flagged(results, "low")) and not pred
        for c in CATEGORIES:
            if c in pred and c in gold:
                rep.tp[c] += 1
            elif c in pred:
                rep.fp[c] += 1
            elif c in gold:
                rep.fn[c] += 1
        if pred != gold:
            rep.errors.append((row["text"], sorted(gold), sorted(pred)))
    return rep


def format_report(rep: Report, title: str) -> str:
    lines = [
        f"{title}: {rep.n} texts, {rep.benign} benign",
        f"{'category':<10} {'precision':>9} {'recall':>7} {'support':>7}",
    ]
    for c in CATEGORIES:
        lines.append(f"{c:<10} {rep.precision(c):>9.3f} {rep.recall(c):>7.3f} {rep.tp[c] + rep.fn[c]:>7}")
    lines.append(
        f"false-positive rate on benign texts: {rep.fp_rate:.3f} ({rep.benign_flagged}/{rep.benign});"
        f" benign annotated 'low' only: {rep.benign_low}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--split", choices=("tune", "heldout", "all"), default=None, help="one split (default: each split, then all)"
    )
    parser.add_argument("--errors", action="store_true", help="list misclassified texts")
    args = parser.parse_args(argv)
    classifier = DefaultClassifier()
    for split in [args.split] if args.split else ["tune", "heldout", "all"]:
        rep = run(classifier, load_rows(args.data, split))
        print(format_report(rep, split))
        if args.errors:
            for text, gold, pred in rep.errors:
                print(f"  gold={gold} pred={pred}: {text}")
        print()


if __name__ == "__main__":
    main()
