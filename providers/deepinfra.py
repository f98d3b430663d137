"""DeepInfra (seeds 001, 003: /work/shared/seeds/001_32fad83248f4a0b2.txt,
003_aea24500abb45d12.txt).

Its stream repeats ``"role": "assistant"`` in every delta and sends a literal
``</s>`` content chunk before the final empty delta. It does not document
``stream_options``, so stream usage is counted by the gateway.

Ranges, as the pages give them, where they are narrower than the gateway's
own validation: ``1 ≤ n ≤ 2`` (both pages), ``0 ≤ top_k < 1000``,
``0.01 ≤ repetition_penalty ≤ 5`` and ``0 ≤ max_tokens ≤ 1000000`` (003). One
range holds for every DeepInfra model: 001's ``max_tokens ≤ 100000`` would
wrongly drop a Nemo request's, and below both caps an endpoint's context
window binds first. temperature, top_p, the penalties and stop's 16 strings
are the gateway's own ranges, so they are not declared.
"""

from providers.base import Provider, Range

PROVIDER = Provider(
    name="deepinfra",
    ranges={
        "n": Range(1, 2),
        "top_k": Range(0, 1000, max_exclusive=True),
        "repetition_penalty": Range(0.01, 5),
        "max_tokens": Range(0, 1_000_000),
    },
    stream_usage=False,
    eos_literals=("</s>",),
    # FastAPI's shapes: {"detail": "..."}, or a list of validation errors.
    error_messages=("detail", "detail.0.msg", "error.message", "error"),
)
