"""Wire types of OpenAI's Responses API (``POST /v1/responses``).

The request is decoded once, at the edge, into :class:`ResponsesRequest`;
a value of the wrong type or range fails there with an error naming its
path (``input[1].content[0].type``). Input items and tools are decoded into
permissive structs whose ``type`` is then checked by the translation
(``pipeline/responses.py``), so an unsupported tool type is named as such
rather than as a missing field. The answer types follow openai-python's
``types/responses`` models; fields this gateway cannot fill are left out
(the SDK reads them as ``None``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from gateway.protocol import MaxTokens, ProviderPreferences, Temperature, TopP

# --- request ---------------------------------------------------------------------


class InputText(Struct, tag_field="type", tag="input_text"):
    text: str


class OutputText(Struct, tag_field="type", tag="output_text"):
    """An assistant message's text, as an earlier response gave it (annotations are ignored)."""

    text: str


class InputRefusal(Struct, tag_field="type", tag="refusal"):
    refusal: str


class InputImage(Struct, kw_only=True, tag_field="type", tag="input_image"):
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] = "auto"


class InputFile(Struct, kw_only=True, tag_field="type", tag="input_file"):
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


InputPart = InputText | OutputText | InputRefusal | InputImage | InputFile
Content = str | list[InputPart]

ItemType = Literal["message", "function_call", "function_call_output"]


class InputItem(Struct, kw_only=True):
    """One input item, any of the supported types: ``message`` (the default,
    as in the SDK's ``EasyInputMessage``), ``function_call`` or
    ``function_call_output``. Which fields a type needs is checked after decoding."""

    type: ItemType = "message"
    role: Literal["user", "assistant", "system", "developer"] | UnsetType = UNSET
    content: Content | UnsetType = UNSET
    call_id: str | UnsetType = UNSET
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET
    output: Content | UnsetType = UNSET


class Tool(Struct, kw_only=True, omit_defaults=True):
    """A tool in Responses' flat shape. Only ``function`` tools are served;
    ``name`` is optional here so another type is refused for its type."""

    type: str
    name: str | UnsetType = UNSET
    description: str | UnsetType | None = UNSET
    parameters: Raw | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET


class ToolChoiceObject(Struct, kw_only=True, omit_defaults=True):
    type: str
    name: str | UnsetType = UNSET


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceObject


class TextFormat(Struct, kw_only=True, omit_defaults=True):
    type: Literal["text", "json_schema", "json_object"]
    name: str | UnsetType = UNSET
    description: str | UnsetType = UNSET
    schema: Raw | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET


class TextConfig(Struct, kw_only=True, omit_defaults=True):
    format: TextFormat | UnsetType = UNSET
    verbosity: Literal["low", "medium", "high"] | UnsetType | None = UNSET


Metadata = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]], Meta(max_length=16)
]


class ResponsesRequest(Struct, kw_only=True):
    """``POST /v1/responses``. Unknown fields are ignored, as on chat completions."""

    input: str | list[InputItem] | UnsetType = UNSET
    instructions: str | None = None
    model: str | UnsetType = UNSET
    models: Annotated[list[str], Meta(max_length=16)] | UnsetType = UNSET
    provider: ProviderPreferences | UnsetType = UNSET
    stream: bool = False
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: Metadata | None = None
    store: bool | None = True
    previous_response_id: str | None = None
    user: str | None = None


# --- chat shapes the translation writes -------------------------------------------


class ChatFunction(Struct, kw_only=True, omit_defaults=True):
    name: str
    description: str | UnsetType | None = UNSET
    parameters: Raw | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET


class ChatTool(Struct, kw_only=True):
    function: ChatFunction
    type: str = "function"


class ChatToolChoiceFunction(Struct):
    name: str


class ChatToolChoice(Struct, kw_only=True):
    function: ChatToolChoiceFunction
    type: str = "function"


class JsonSchema(Struct, kw_only=True, omit_defaults=True):
    name: str
    schema: Raw | UnsetType = UNSET
    description: str | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET


class ChatResponseFormat(Struct, kw_only=True, omit_defaults=True):
    type: str
    json_schema: JsonSchema | UnsetType = UNSET


class ChatImageURL(Struct):
    url: str
    detail: str


class ChatImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: ChatImageURL


class CallFunction(Struct):
    name: str
    arguments: str


class ToolCall(Struct):
    """One call in a chat message's ``tool_calls``."""

    id: str
    function: CallFunction
    type: str = "function"


class CallDeltaFunction(Struct, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True):
    """One piece of a streamed tool call, as the relay normalizes it: ``index``
    always, ``id`` and ``function.name`` on a call's first piece only."""

    index: int = 0
    id: str | None = None
    function: CallDeltaFunction | None = None


# --- answer ----------------------------------------------------------------------


class OutputTextPart(Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Raw] = []


class RefusalPart(Struct, tag_field="type", tag="refusal"):
    refusal: str


OutputContent = OutputTextPart | RefusalPart


class OutputMessage(Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: str
    content: list[OutputContent]
    role: str = "assistant"


class FunctionCall(Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = OutputMessage | FunctionCall


class InputTokensDetails(Struct, frozen=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct, frozen=True):
    reasoning_tokens: int = 0


class ResponseUsage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    estimated_cost: float | None = None


class IncompleteDetails(Struct):
    reason: str


class ResponseError(Struct):
    code: str
    message: str


class ResponseHead(Struct, kw_only=True):
    """What a response object says about its answer; the request's echoes
    (:class:`ResponseEcho`) follow it in the same JSON object."""

    id: str
    object: str = "response"
    created_at: int
    status: str
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    provider: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None


class ResponseEcho(Struct, kw_only=True):
    """The request's settings as a response object repeats them, encoded once per request."""

    instructions: str | None
    max_output_tokens: int | None
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    top_p: float | None
    text: Raw
    tool_choice: Raw
    tools: Raw
    truncation: str = "disabled"
    metadata: dict[str, str]
    user: str | None


class Deleted(Struct):
    id: str
    object: str = "response"
    deleted: bool = True


# --- stream events (each also carries ``type`` and ``sequence_number``) ------------


class LifecycleEvent(Struct):
    """``response.created``, ``.in_progress``, ``.completed``, ``.incomplete``, ``.failed``."""

    type: str
    sequence_number: int
    response: Raw


class OutputItemEvent(Struct):
    """``response.output_item.added`` and ``.done``."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(Struct):
    """``response.content_part.added`` and ``.done``."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputContent


class TextDeltaEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Raw] = []


class TextDoneEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Raw] = []


class ArgumentsDeltaEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Struct):
    type: str
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str
