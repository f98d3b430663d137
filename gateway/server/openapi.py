"""OpenAPI entries of the POST routes answered on the ASGI fast path.

Litestar lists only its HTTP handlers in ``/openapi``, not raw ASGI ones, so
each fast path's operation is written here and added to the schema once the
app is built.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.openapi.spec import OpenAPIResponse, Operation, PathItem, Reference

from gateway.pipeline.messages import MESSAGES_PATH
from gateway.pipeline.responses import RESPONSES_PATH
from gateway.server.asgi import CHAT_PATH, EMBEDDINGS_PATH


def _responses(ok: str, invalid: str) -> dict[str, OpenAPIResponse | Reference]:
    """Every fast path's answers: its own 200 and 400, and the 401 and 429 they share."""
    return {
        "200": OpenAPIResponse(description=ok),
        "400": OpenAPIResponse(description=invalid),
        "401": OpenAPIResponse(description="No valid gateway key (the body is not read)"),
        "429": OpenAPIResponse(description="The key's limits, or every provider rate limited"),
    }


CHAT_DOC = Operation(
    operation_id="createChatCompletion",
    summary="Create a chat completion (OpenAI's chat completions API)",
    description=(
        "OpenAI's request plus the seeds' extras (`top_k`, `min_p`, `repetition_penalty`) and OpenRouter's "
        "routing controls: `models` (fallbacks), `provider` {order, only, ignore, allow_fallbacks, "
        "require_parameters, data_collection, zdr, quantizations, sort, max_price, preferred_min_throughput, "
        "preferred_max_latency}, and the `:floor` and `:nitro` model suffixes. Routed by price, context and "
        "health, failed over, limited and accounted; the answer is OpenAI's completion (or its SSE stream) plus "
        "`provider`, `usage.estimated_cost` and content-filter results."
    ),
    tags=["chat"],
    responses=_responses(
        "The completion, or its event stream",
        "An invalid request, or a parameter no endpoint takes",
    ),
)


EMBEDDINGS_DOC = Operation(
    operation_id="createEmbeddings",
    summary="Create embeddings (OpenAI's embeddings API)",
    description=(
        "OpenAI's request: `model` (an embedding model of the catalog; `models` as fallbacks), `input` (a string, "
        "a list of strings, a list of token ids or a list of lists of token ids; at most 2048), `encoding_format` "
        "(`float` or `base64`), `dimensions` (only on endpoints that list it), `user`, and OpenRouter's `provider` "
        "routing object. Routed, failed over, limited (tpm counts input tokens) and accounted as chat is; the "
        "answer is OpenAI's list of embeddings plus `provider` and `usage.estimated_cost`."
    ),
    tags=["embeddings"],
    responses=_responses(
        "The vectors, in input order, with usage and cost",
        "An invalid request, a chat model, or `dimensions` no endpoint takes",
    ),
)


#: The OpenAPI entry of ``POST /v1/messages`` (a raw ASGI route, which litestar does not list).
MESSAGES_DOC = Operation(
    operation_id="createMessage",
    summary="Create a message (Anthropic's Messages API)",
    description=(
        "Anthropic's request: `model` (`models` as fallbacks, OpenRouter's `provider`), `max_tokens` (required), "
        "`system`, `messages` with text, image, tool_use and tool_result blocks, `stop_sequences`, `temperature` "
        "(0..1), `top_p`, `top_k`, client `tools`, `tool_choice`, `metadata.user_id`, `stream`. The key goes in "
        "`x-api-key` or `Authorization: Bearer`. Answered on the chat pipeline (routing, limits, failover, "
        "accounting); the answer is Anthropic's message, plus `provider` and `usage.estimated_cost`; a stream is "
        "Anthropic's events. Errors are `{type: error, error: {type, message}}`."
    ),
    tags=["messages"],
    responses=_responses(
        "The message, or its event stream",
        "An invalid request (max_tokens missing, a server tool...)",
    ),
)


#: The OpenAPI entry of ``POST /v1/responses`` (a raw ASGI route, which litestar does not list).
RESPONSES_DOC = Operation(
    operation_id="createResponse",
    summary="Create a response (OpenAI's Responses API)",
    description=(
        "OpenAI's request: `model` (`models` as fallbacks, OpenRouter's `provider`), `input` (a string, or "
        "message, function_call and function_call_output items), `instructions`, `max_output_tokens`, "
        "`temperature`, `top_p`, function `tools` (no built-in tools), `tool_choice`, `parallel_tool_calls`, "
        "`text.format` (text, json_object, json_schema), `metadata`, `store` (default true), "
        "`previous_response_id`, `user`, `stream`. Answered on the chat pipeline (routing, limits, failover, "
        "accounting); the answer is OpenAI's Response object plus `provider` and `usage.estimated_cost`, or its "
        "typed event stream. A stored response is kept as long as generation records."
    ),
    tags=["responses"],
    responses=_responses(
        "The response, or its event stream",
        "An invalid request (a built-in tool, an unknown previous_response_id...)",
    ),
)


def document_fast_paths(app: Litestar) -> None:
    """Add the fast paths' POST operations to the app's OpenAPI schema."""
    schema = app.openapi_schema
    schema.paths = {
        **(schema.paths or {}),
        CHAT_PATH: PathItem(post=CHAT_DOC),
        RESPONSES_PATH: PathItem(post=RESPONSES_DOC),
        MESSAGES_PATH: PathItem(post=MESSAGES_DOC),
        EMBEDDINGS_PATH: PathItem(post=EMBEDDINGS_DOC),
    }
