"""Usage and cost: what a request consumed, and what it cost at the price of
the endpoint that served it.

Upstream token counts win when the upstream reports them; otherwise the
model's own tokenizer counts. A missing price is ``estimated_cost: null``
with a warning, never a silent 0.
"""

from __future__ import annotations

import logging

from gateway.protocol import UpstreamUsage, Usage
from gateway.routing.catalog import Endpoint
from gateway.routing.tokens import count_text

log = logging.getLogger("gateway.accounting")


def usage_for(
    endpoint: Endpoint,
    tokenizer: str,
    reported: UpstreamUsage | None,
    prompt_tokens: int,
    completion_text: str,
) -> Usage:
    """``prompt_tokens`` is the gateway's own count, used when the upstream gave none."""
    prompt = reported.prompt_tokens if reported and reported.prompt_tokens is not None else prompt_tokens
    if reported and reported.completion_tokens is not None:
        completion = reported.completion_tokens
    else:
        completion = count_text(completion_text, tokenizer)
    cost = endpoint.cost(prompt, completion)
    if cost is None:
        log.warning("no price for %s on %s: estimated_cost is null", endpoint.model_id, endpoint.provider.name)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        estimated_cost=None if cost is None else round(cost, 10),
    )


def price_warning(endpoint: Endpoint) -> str | None:
    """The response-header warning for an unpriced endpoint."""
    if endpoint.priced:
        return None
    return f"no price configured for {endpoint.model_id} on {endpoint.provider.name}; estimated_cost is null"
