"""Novita AI (seed 000): plain OpenAI wire format; sends its own
``content_filter_results`` per choice, which the gateway merges with its own."""

from providers.base import Provider, Range

PROVIDER = Provider(
    name="novita",
    ranges={"temperature": Range(0, 2), "top_p": Range(0, 1), "min_p": Range(0, 1)},
)
