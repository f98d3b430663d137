"""Wire types of Anthropic's Messages API (``POST /v1/messages`` and
``POST /v1/messages/count_tokens``), as the official SDK sends and reads them.

Requests are decoded once, at the edge, into these Structs: a block of a type
the gateway cannot translate, or a field of the wrong type, fails there with
an error naming its path (``messages[0].content[1].type``). Unknown fields
(``cache_control``, ``citations``, ``thinking``, ``service_tier``...) are
ignored. Tool inputs and schemas stay ``msgspec.Raw``: they are JSON the
gateway only forwards.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from gateway.protocol import MaxTokens, ProviderPreferences, StopList, TopK, TopP

#: Anthropic's temperature range (chat's goes to 2).
Temperature = Annotated[float, Meta(ge=0, le=1)]


# --- request content blocks ------------------------------------------------------


class TextBlock(Struct, tag_field="type", tag="text"):
    text: str


class Base64Source(Struct, tag_field="type", tag="base64"):
    media_type: str
    data: str


class URLSource(Struct, tag_field="type", tag="url"):
    url: str


class ImageBlock(Struct, tag_field="type", tag="image"):
    source: Base64Source | URLSource


class ToolUseBlock(Struct, tag_field="type", tag="tool_use"):
    """A tool call the assistant made; ``input`` is a JSON object (checked on translation)."""

    id: str
    name: str
    input: Raw


class ToolResultBlock(Struct, tag_field="type", tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] = ""
    is_error: bool = False


class ThinkingBlock(Struct, tag_field="type", tag="thinking"):
    """Extended thinking handed back by a client; the gateway's models do not
    read it, so it is dropped (it never produces one)."""


class RedactedThinkingBlock(Struct, tag_field="type", tag="redacted_thinking"):
    """As :class:`ThinkingBlock`: dropped."""


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class InputMessage(Struct, kw_only=True):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Tool(Struct, kw_only=True):
    """A client tool. Server tools (``web_search_20250305``, ``bash_20250124``...)
    carry another ``type``; the translation refuses them."""

    name: str
    description: str | UnsetType = UNSET
    input_schema: Raw | UnsetType = UNSET
    type: str | UnsetType | None = UNSET


class ToolChoiceAuto(Struct, tag_field="type", tag="auto", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Struct, tag_field="type", tag="any", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Struct, tag_field="type", tag="tool", kw_only=True):
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Struct, tag_field="type", tag="none"):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(Struct, kw_only=True):
    user_id: str | None = None


class CountTokensRequest(Struct, kw_only=True):
    """``POST /v1/messages/count_tokens``: what a message request is, less its
    output controls. Unknown fields are ignored."""

    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    model: str | UnsetType = UNSET
    system: str | list[TextBlock] | UnsetType = UNSET
    tools: list[Tool] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET
    # The gateway's routing extras, as chat takes them.
    models: Annotated[list[str], Meta(max_length=16)] | UnsetType = UNSET
    provider: ProviderPreferences | UnsetType = UNSET


class MessagesRequest(CountTokensRequest, kw_only=True):
    """``POST /v1/messages``. ``max_tokens`` is required, as Anthropic requires it."""

    max_tokens: MaxTokens
    stop_sequences: StopList | UnsetType = UNSET
    temperature: Temperature | UnsetType = UNSET
    top_p: TopP | UnsetType = UNSET
    top_k: TopK | UnsetType = UNSET
    metadata: Metadata | UnsetType = UNSET
    stream: bool = False


# --- responses -------------------------------------------------------------------


class TextOut(Struct, tag_field="type", tag="text"):
    text: str


class ToolUseOut(Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    #: A JSON object.
    input: Raw


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]


class MessageUsage(Struct, kw_only=True):
    """Anthropic's usage, plus the gateway's ``estimated_cost`` (USD)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    estimated_cost: float | None = None


class MessageOut(Struct, kw_only=True):
    """A message answer; ``stop_reason`` is null only in a stream's ``message_start``."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextOut | ToolUseOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage
    #: The provider that answered (the gateway's extra, as in chat answers).
    provider: str


class CountTokensOut(Struct):
    input_tokens: int


# --- stream events (the ones written from structs; the hot ones are byte templates) ---


class MessageStart(Struct, tag_field="type", tag="message_start"):
    message: MessageOut


class MessageDeltaBody(Struct):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class DeltaUsage(Struct, kw_only=True):
    """Cumulative counts: the SDK overwrites its snapshot's with them,
    ``input_tokens`` included (the prompt is counted only at the end)."""

    input_tokens: int
    output_tokens: int
    estimated_cost: float | None = None


class MessageDelta(Struct, tag_field="type", tag="message_delta"):
    delta: MessageDeltaBody
    usage: DeltaUsage


class ContentBlockStart(Struct, tag_field="type", tag="content_block_start"):
    index: int
    content_block: TextOut | ToolUseOut


# --- errors ----------------------------------------------------------------------


class ErrorDetail(Struct):
    type: str
    message: str


class ErrorOut(Struct, tag_field="type", tag="error", omit_defaults=True):
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""

    error: ErrorDetail
    request_id: str | None = None
