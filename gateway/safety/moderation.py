"""The content-filter step of a request: classify, merge, apply the policy.

Prompts and whole completions go to the configured classifier (the in-process
default, or an external ``/v1/moderations`` service with the default as its
fallback); streamed completions go through a :class:`StreamScanner` per
choice, chunk by chunk. Results an upstream sent are merged (the graver one
wins), then the key's, the model's or the global policy decides what is
filtered.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import msgspec

from gateway.config import Policy, SafetyConfig
from gateway.protocol import ContentFilterResults
from gateway.safety.classifier import DefaultClassifier, StreamScanner
from gateway.safety.external import ExternalModerationClassifier
from gateway.safety.policy import any_filtered, evaluate
from gateway.safety.results import decode_upstream, merge

_CATEGORIES = ("hate", "self_harm", "sexual", "violence", "jailbreak", "profanity")


@functools.cache
def default_classifier() -> DefaultClassifier:
    """Built once per process: loading the term lists and the profanity model takes seconds."""
    return DefaultClassifier()


class Moderation:
    def __init__(self, config: SafetyConfig, env: dict[str, str] | None = None) -> None:
        self.default = default_classifier()
        self.policy = config.policy()
        self.external: ExternalModerationClassifier | None = None
        if config.endpoint:
            environ: Mapping[str, str] = os.environ if env is None else env
            self.external = ExternalModerationClassifier(
                config.endpoint,
                model=config.model,
                timeout_s=config.timeout_s,
                api_key=environ.get(config.api_key_env) if config.api_key_env else None,
                fallback=self.default,
            )

    async def classify(self, text: str) -> ContentFilterResults:
        if self.external is not None:
            return await self.external.classify(text)
        return self.default.classify(text)

    def may_screen_late(self, policy: Policy) -> bool:
        """Whether a prompt's results can wait until the upstream is called:
        in ``annotate`` mode they never stop a request, and the in-process
        classifier needs no round trip that a refused request should not cost."""
        return policy.mode == "annotate" and self.external is None

    def classify_now(self, text: str) -> ContentFilterResults | None:
        """The in-process classifier's results at once; None when an external
        service classifies (``classify`` then)."""
        return self.default.classify(text) if self.external is None else None

    def scanner(self) -> StreamScanner:
        return StreamScanner(self.default)

    @staticmethod
    def decide(
        ours: ContentFilterResults, upstream: ContentFilterResults | None, policy: Policy
    ) -> ContentFilterResults:
        """Merged results with ``filtered`` set by the policy; an upstream that
        says it filtered something is believed too."""
        if policy.mode == "annotate":
            return merge(ours, upstream)  # nothing of ours is filtered; an upstream's flags are kept
        out = evaluate(merge(ours, upstream), policy)
        if upstream is not None:
            for name in _CATEGORIES:
                if getattr(upstream, name).filtered:
                    getattr(out, name).filtered = True
        return out

    @staticmethod
    def blocked(results: ContentFilterResults) -> bool:
        return any_filtered(results)

    def completion_filter(self, policy: Policy) -> CompletionFilter:
        """The policy applied to one request's completions."""
        return CompletionFilter(self, policy)

    async def close(self) -> None:
        if self.external is not None:
            await self.external.aclose()


class CompletionFilter:
    """The content policy applied to one request's completions: a whole
    answer at once, or a streamed choice through a :class:`ChoiceScreen`."""

    __slots__ = ("moderation", "per_chunk", "policy")

    def __init__(self, moderation: Moderation, policy: Policy) -> None:
        self.moderation = moderation
        self.policy = policy
        #: Block mode screens each chunk, to cut a stream at the offending
        #: delta; annotate mode needs results only at the end, and classifies
        #: the whole text once then.
        self.per_chunk = policy.mode == "block"

    async def check(self, text: str, upstream: msgspec.Raw | None) -> ContentFilterResults:
        """A whole completion's results, merged with the upstream's own."""
        ours = await self.moderation.classify(text)
        return self.moderation.decide(ours, decode_upstream(upstream), self.policy)

    def screen(self) -> ChoiceScreen:
        return ChoiceScreen(self)

    @staticmethod
    def blocked(results: ContentFilterResults) -> bool:
        return any_filtered(results)


class ChoiceScreen:
    """One streamed choice under the policy: fed delta by delta, classified
    incrementally (never from the start again) in block mode."""

    __slots__ = ("_filter", "_scanner")

    def __init__(self, completion_filter: CompletionFilter) -> None:
        self._filter = completion_filter
        self._scanner = completion_filter.moderation.scanner()

    def feed(self, text: str) -> None:
        if self._filter.per_chunk:
            self._scanner.feed(text)

    def check(self, upstream: msgspec.Raw | None) -> ContentFilterResults | None:
        """Block mode: the results so far. Annotate mode: None (see ``final``)."""
        if not self._filter.per_chunk:
            return None
        f = self._filter
        return f.moderation.decide(self._scanner.result(), decode_upstream(upstream), f.policy)

    def final(self, text: str, upstream: msgspec.Raw | None) -> ContentFilterResults:
        """The choice's results at its end; ``text`` is all of it."""
        if not self._filter.per_chunk:
            self._scanner.feed(text)
        f = self._filter
        return f.moderation.decide(self._scanner.result(), decode_upstream(upstream), f.policy)
