"""OpenRouter (seeds 002, 004: /work/shared/seeds/002_c54c6511b505e196.txt,
004_21116787a02c0330.txt): OpenAI wire format, optional attribution headers
(``HTTP-Referer``, ``X-Title``; set them in ``[providers.openrouter]
headers``), SSE comment lines while it waits, usage in streams on request.

Seed 002 lists repetition_penalty without a range, and seed 004 sends the
reader to OpenRouter's request docs for every parameter; those give
repetition_penalty ``(0, 2]`` (https://openrouter.ai/docs/api-reference/chat-completion),
and OpenRouter answers 400 to a 3, which the gateway takes up to 5: a value
over 2 is dropped here. logit_bias's -100 to 100 (seed 002) is the gateway's
own validation, so it is not declared.
"""

from providers.base import Provider, Range

PROVIDER = Provider(
    name="openrouter",
    ranges={"repetition_penalty": Range(0, 2, min_exclusive=True)},
)
