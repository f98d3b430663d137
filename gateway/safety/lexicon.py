"""Term lists (data files) compiled into one Aho-Corasick automaton.

Each ``data/*.toml`` file may hold:

``[[terms]]``      category, severity, phrases: a direct hit. With ``raw = true``
                   the phrases are matched as substrings of the lower-cased
                   text instead (role markers such as ``<|im_start|>system``,
                   whose punctuation normalisation would strip).
``[[tags]]``       tag, phrases: a word class used only by combos/modifiers.
``[[combos]]``     category, severity, a, b (tags), within (chars): both tags
                   hit, with at most that many characters between them ("how to make" near
                   "pipe bomb"; a group noun near "vermin").
``[[exempt]]``     phrases: benign look-alikes; a hit lying inside an exempt
                   span is dropped ("kill the process", "bomb-sniffing dog").
``[[downgrade]]``  category, tag, levels: when the tag occurs in the text, the
                   category's severity drops by that many levels (help-seeking
                   and medical questions about self-harm).

Phrase syntax: ``{a|b|}`` expands to alternatives (an empty one included),
a trailing ``*`` makes a prefix match (``fuck*`` covers "fucking").
Every phrase goes through the same normalisation as the text.
"""

from __future__ import annotations

import functools
import itertools
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources

import ahocorasick

from gateway.protocol import SeverityLevel
from gateway.safety.normalize import Normalizer

SEVERITY_CATEGORIES = ("hate", "self_harm", "sexual", "violence")
DETECTION_CATEGORIES = ("jailbreak", "profanity")
CATEGORIES = SEVERITY_CATEGORIES + DETECTION_CATEGORIES
RANK = {"safe": 0, "low": 1, "medium": 2, "high": 3}
LEVELS: tuple[SeverityLevel, ...] = ("safe", "low", "medium", "high")


# Kinds of automaton entries.
TERM, TAG, EXEMPT = 0, 1, 2


def expand(phrase: str) -> list[str]:
    """``"ignore {all |}{previous|prior} rules"`` -> the four spellings.
    Braces nest: ``"{a {b|c}|d}"`` -> a b, a c, d."""
    out, rest = _expand_seq(phrase, 0)
    if rest != len(phrase):
        raise ValueError(f"unbalanced braces in {phrase!r}")
    return out


def _expand_seq(s: str, i: int) -> tuple[list[str], int]:
    """Expand from ``i`` up to an unmatched ``|`` or ``}`` (or the end)."""
    results = [""]
    while i < len(s) and s[i] not in "|}":
        if s[i] == "{":
            alternatives: list[str] = []
            i += 1
            while True:
                part, i = _expand_seq(s, i)
                alternatives.extend(part)
                if i >= len(s):
                    raise ValueError(f"unbalanced braces in {s!r}")
                if s[i] == "}":
                    i += 1
                    break
                i += 1  # skip "|"
            results = [r + a for r in results for a in alternatives]
        else:
            j = i
            while j < len(s) and s[j] not in "{|}":
                j += 1
            results = [r + s[i:j] for r in results]
            i = j
    return results, i


def _one_variants(word: str) -> Iterator[str]:
    """'1' in leetspeak stands for 'i' or 'l'; the text decodes it to 'i', so
    a term with 'l' also gets spellings with some 'l's as 'i' ("ki11")."""
    positions = [i for i, c in enumerate(word) if c == "l"]
    if not positions:
        return
    if len(positions) > 4:
        yield word.replace("l", "i")
        return
    for r in range(1, len(positions) + 1):
        for subset in itertools.combinations(positions, r):
            chars = list(word)
            for i in subset:
                chars[i] = "i"
            yield "".join(chars)


@dataclass(frozen=True, slots=True)
class Entry:
    kind: int
    name: str  # category, tag or "" for exempt
    severity: str
    length: int  # length of the matched key in the normalised text
    trail: int = 1  # 1 when the key ends with the padding space (not a prefix)


@dataclass(slots=True)
class Combo:
    category: str
    severity: str
    a: str
    b: str
    within: int


@dataclass(slots=True)
class Lexicon:
    normalizer: Normalizer
    automaton: ahocorasick.Automaton
    raw: ahocorasick.Automaton | None = None
    combos: list[Combo] = field(default_factory=list)
    downgrades: list[tuple[str, str, int]] = field(default_factory=list)
    size: int = 0


def _keys(normalizer: Normalizer, phrase: str) -> Iterator[str]:
    for spelled in expand(phrase):
        prefix = spelled.endswith("*")
        norm = normalizer.normalize(spelled.rstrip("*"))
        if norm.strip() == "":
            continue
        if prefix:
            norm = norm.rstrip()  # " fuck" matches " fucking "
        yield norm
        body = norm.strip()
        for variant in _one_variants(body):
            yield norm.replace(body, variant)


@functools.lru_cache(maxsize=4)
def load(package: str = "gateway.safety", folder: str = "data") -> Lexicon:
    """Read every TOML file under the data folder into one automaton.

    Cached: the result is read-only after construction, so classifiers built
    in one process share it (building it is slow).
    """
    root = resources.files(package) / folder
    docs = []
    for f in sorted(root.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".toml"):
            try:
                docs.append(tomllib.loads(f.read_text("utf-8")))
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{f.name}: {exc}") from exc
    confusables: dict[str, str] = {}
    for doc in docs:
        confusables.update(doc.get("confusables", {}))
    normalizer = Normalizer(confusables)
    automaton = ahocorasick.Automaton()
    entries: dict[str, list[Entry]] = {}

    def add(key: str, entry: Entry) -> None:
        entries.setdefault(key, []).append(entry)

    combos: list[Combo] = []
    downgrades: list[tuple[str, str, int]] = []
    raw: dict[str, tuple[str, int]] = {}
    for doc in docs:
        for block in doc.get("terms", []):
            category, severity = block["category"], block.get("severity", "high")
            if category not in CATEGORIES or severity not in RANK:
                raise ValueError(f"bad term block {category}/{severity}")
            if block.get("raw", False):
                for phrase in block["phrases"]:
                    raw[normalizer.fold(phrase)] = (category, RANK[severity])
                continue
            for phrase in block["phrases"]:
                for key in _keys(normalizer, phrase):
                    add(key, Entry(TERM, category, severity, len(key), int(key.endswith(" "))))
                    # Letter-spaced text ("k i l l m y s e l f") collapses to
                    # one word; long multi-word terms also match that form.
                    joined = " " + key.strip().replace(" ", "") + (" " if key.endswith(" ") else "")
                    if " " in key.strip() and len(joined.strip()) >= 9:
                        add(joined, Entry(TERM, category, severity, len(joined), int(joined.endswith(" "))))
        for block in doc.get("tags", []):
            for phrase in block["phrases"]:
                for key in _keys(normalizer, phrase):
                    add(key, Entry(TAG, block["tag"], "", len(key), int(key.endswith(" "))))
        for block in doc.get("exempt", []):
            for phrase in block["phrases"]:
                for key in _keys(normalizer, phrase):
                    add(key, Entry(EXEMPT, "", "", len(key), int(key.endswith(" "))))
        for block in doc.get("combos", []):
            if block["category"] not in CATEGORIES:
                raise ValueError(f"bad combo category {block['category']}")
            combos.append(
                Combo(
                    block["category"],
                    block.get("severity", "high"),
                    block["a"],
                    block["b"],
                    int(block.get("within", 60)),
                )
            )
        for block in doc.get("downgrade", []):
            downgrades.append((block["category"], block["tag"], int(block.get("levels", 1))))
    for key, es in entries.items():
        automaton.add_word(key, tuple(dict.fromkeys(es)))
    automaton.make_automaton()
    raw_automaton = None
    if raw:
        raw_automaton = ahocorasick.Automaton()
        for key, value in raw.items():
            raw_automaton.add_word(key, value)
        raw_automaton.make_automaton()
    return Lexicon(normalizer, automaton, raw_automaton, combos, downgrades, len(entries) + len(raw))


def scan_raw(lexicon: Lexicon, folded: str, found: dict[str, int]) -> None:
    """Substring hits of the raw terms in the folded (not normalised) text."""
    if lexicon.raw is None:
        return
    for _end, (category, rank) in lexicon.raw.iter(folded):
        if rank > found.get(category, 0):
            found[category] = rank


def scan(lexicon: Lexicon, view: str) -> dict[str, int]:
    """Worst severity rank per category found in one normalised view.

    Detection categories are reported with rank 3 when detected.
    """
    hits: list[tuple[int, int, Entry]] = []
    exempt: list[tuple[int, int]] = []
    for end, entries in lexicon.automaton.iter(view):
        for e in entries:
            # The word span, without the padding spaces around the key.
            start, stop = end - e.length + 2, end - e.trail
            if e.kind == EXEMPT:
                exempt.append((start, stop))
            else:
                hits.append((start, stop, e))
    if not hits:
        return {}
    if exempt:
        hits = [h for h in hits if not any(s <= h[0] and h[1] <= t for s, t in exempt)]
    found: dict[str, int] = {}
    tags: dict[str, list[tuple[int, int]]] = {}
    for start, stop, e in hits:
        if e.kind == TERM:
            rank = RANK[e.severity]
            if rank > found.get(e.name, 0):
                found[e.name] = rank
        else:
            tags.setdefault(e.name, []).append((start, stop))
    for combo in lexicon.combos:
        pa, pb = tags.get(combo.a), tags.get(combo.b)
        # ``within``: at most that many characters between the two spans.
        if pa and pb and any(max(b0 - a1, a0 - b1) <= combo.within for a0, a1 in pa for b0, b1 in pb):
            rank = RANK[combo.severity]
            if rank > found.get(combo.category, 0):
                found[combo.category] = rank
    for category, tag, levels in lexicon.downgrades:
        if category in found and tag in tags:
            found[category] = max(RANK["low"], found[category] - levels) if found[category] else 0
    return found
