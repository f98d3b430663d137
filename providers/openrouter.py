"""OpenRouter (seeds 002, 004): OpenAI wire format, optional attribution
headers (``HTTP-Referer``, ``X-Title``; set them in ``[providers.openrouter]
headers``), SSE comment lines while it waits, usage in streams on request."""

from providers.base import Provider, Range

PROVIDER = Provider(
    name="openrouter",
    ranges={"logit_bias": Range(-100, 100)},
)
