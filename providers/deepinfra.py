"""DeepInfra (seeds 001, 003).

Its stream repeats ``"role": "assistant"`` in every delta and sends a literal
``</s>`` content chunk before the final empty delta. n is limited to 2, top_k
to 0..999, repetition_penalty to 0.01..5. It does not document
``stream_options``, so stream usage is counted by the gateway.
"""

from providers.base import Provider, Range

PROVIDER = Provider(
    name="deepinfra",
    ranges={
        "n": Range(1, 2),
        "temperature": Range(0, 2),
        "top_k": Range(0, 999),
        "repetition_penalty": Range(0.01, 5),
        "max_tokens": Range(0, 1_000_000),
    },
    stream_usage=False,
    eos_literals=("</s>",),
    # FastAPI's shapes: {"detail": "..."}, or a list of validation errors.
    error_messages=("detail", "detail.0.msg", "error.message", "error"),
)
