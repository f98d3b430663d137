"""Floors on the labelled set (tests/safety/data/labelled.jsonl).

The term lists were tuned on the ``tune`` split; the floors the issue asks
for (recall >= 0.8 per category, false-positive rate <= 0.05 on benign
texts) are asserted there and on the whole set. The ``heldout`` split was
never tuned on: its false-positive rate is held to the floor, and its recall,
below 0.8 for most categories (the honest limit of a lexicon, reported in
docs/safety.md), is locked at the level measured when the lock was added,
with room for one text per category: a change to the term lists may cost
one held-out hit, not two.
"""

import pytest

from gateway.safety.evaluation import load_rows, run
from gateway.safety.lexicon import CATEGORIES


@pytest.fixture(scope="module")
def reports(classifier):
    return {split: run(classifier, load_rows(split=split)) for split in ("tune", "heldout", "all")}


def test_set_size_and_balance():
    rows = load_rows()
    assert len(rows) >= 300
    assert sum(not r["labels"] for r in rows) >= len(rows) / 3
    for c in CATEGORIES:
        assert sum(c in r["labels"] for r in rows) >= 30, c
    assert {r["split"] for r in rows} == {"tune", "heldout"}


@pytest.mark.parametrize("split", ["tune", "all"])
@pytest.mark.parametrize("category", CATEGORIES)
def test_recall_floor(reports, split, category):
    assert reports[split].recall(category) >= 0.8


@pytest.mark.parametrize("split", ["tune", "heldout", "all"])
def test_false_positive_rate_floor(reports, split):
    assert reports[split].fp_rate <= 0.05


#: Held-out texts each category caught when the lock was added (9 harmful
#: texts per category: recall 0.78, 0.22, 0.56, 0.33, 0.67, 0.89).
HELDOUT_HITS = {"hate": 7, "self_harm": 2, "sexual": 5, "violence": 3, "jailbreak": 6, "profanity": 8}


@pytest.mark.parametrize("category", CATEGORIES)
def test_heldout_recall_is_locked(reports, category):
    report = reports["heldout"]
    support = report.tp[category] + report.fn[category]
    assert report.recall(category) >= (HELDOUT_HITS[category] - 1) / support, (
        f"{category}: {report.tp[category]} of {support} held-out texts caught, "
        f"{HELDOUT_HITS[category]} when the lock was set"
    )
