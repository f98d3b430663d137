"""Wire types of the OpenAI chat API, plus the seeds' and OpenRouter's extras.

Requests are decoded once, at the edge, into these Structs; out-of-range
values fail there with an error naming the parameter. Fields the gateway only
forwards (tools, response_format, tool calls, logprobs) stay ``msgspec.Raw`` so
they pass through byte for byte.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

Temperature = Annotated[float, Meta(ge=0, le=2)]
TopP = Annotated[float, Meta(gt=0, le=1)]
TopK = Annotated[int, Meta(ge=0)]
MinP = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Meta(gt=0, le=5)]
MaxTokens = Annotated[int, Meta(ge=1)]
N = Annotated[int, Meta(ge=1, le=128)]
Bias = Annotated[float, Meta(ge=-100, le=100)]
StopList = Annotated[list[str], Meta(max_length=16)]
USDPerMTok = Annotated[float, Meta(ge=0)]


class TextPart(Struct, tag_field="type", tag="text"):
    text: str


class ImageURL(Struct):
    url: str


class ImagePart(Struct, tag_field="type", tag="image_url"):
    image_url: ImageURL


class InputAudio(Struct):
    data: str
    format: str


class AudioPart(Struct, tag_field="type", tag="input_audio"):
    input_audio: InputAudio


class FileRef(Struct, kw_only=True):
    file_data: str | UnsetType = UNSET
    file_id: str | UnsetType = UNSET
    filename: str | UnsetType = UNSET


class FilePart(Struct, tag_field="type", tag="file"):
    file: FileRef


class RefusalPart(Struct, tag_field="type", tag="refusal"):
    refusal: str


#: The content part types OpenAI's chat API takes; any other type is refused,
#: as OpenAI refuses it. Fields the gateway does not read are ignored here and
#: still forwarded, since the parts themselves stay ``Raw``.
ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart
PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
_part_decoder = msgspec.json.Decoder(ContentPart)


class ContentPartError(ValueError):
    """A content part of the wrong shape: which one (its index) and why."""

    def __init__(self, index: int, message: str, path: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.message = message
        #: Where in the part, as ``.image_url.url``; empty for the part itself.
        self.path = path


_PART_AT = re.compile(r"\s+- at `\$(?P<path>[^`]*)`$")


def content_text(parts: list[Raw]) -> str:
    """The text parts' text, joined; raises :class:`ContentPartError` for a part
    that is not one of ``PART_TYPES`` with its fields of the right types, so
    nothing after the decoder meets a part of an unexpected shape."""
    texts = []
    for j, raw in enumerate(parts):
        try:
            part = _part_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            text = str(exc)
            match = _PART_AT.search(text)
            path = match.group("path") if match else ""
            message = text[: match.start()] if match else text
            if path == ".type" and message.startswith("Invalid value"):
                path, message = "", f"unknown content part type; expected one of {', '.join(PART_TYPES)}"
            raise ContentPartError(j, message, path) from None
        except (msgspec.DecodeError, RecursionError):
            raise ContentPartError(j, "unreadable content part") from None
        if type(part) is TextPart:
            texts.append(part.text)
    return "\n".join(texts)


class Message(Struct, kw_only=True, omit_defaults=True, dict=True):
    """One chat message. ``dict=True`` gives each a ``__dict__``, where the text
    of list content is kept once computed (it is never encoded)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Raw] | None = None
    name: str | UnsetType = UNSET
    tool_calls: Raw | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET
    function_call: Raw | UnsetType = UNSET

    def text(self) -> str:
        """The message's text, for token counting and content filtering;
        raises :class:`ContentPartError` for a malformed content part."""
        content = self.content
        if isinstance(content, str):
            return content
        if not content:
            return ""
        text: str | None = self.__dict__.get("_text")
        if text is None:
            text = self.__dict__["_text"] = content_text(content)
        return text


class StreamOptions(Struct, kw_only=True, omit_defaults=True):
    include_usage: bool = False


class MaxPrice(Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenRouter's max_price, in USD per million tokens (``request``: USD per
    request, honoured only where the catalog has a per-request price)."""

    prompt: USDPerMTok | None = None
    completion: USDPerMTok | None = None
    request: Annotated[float, Meta(ge=0)] | None = None


SortBy = Literal["price", "latency", "throughput"]


class SortSpec(Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenRouter's object form of ``sort``: ``by`` as the string form;
    ``partition`` ``model`` (the default: each model's endpoints sorted on
    their own, the models in the order asked) or ``none`` (one sort across them)."""

    by: SortBy
    partition: Literal["model", "none"] | None = None


class Percentiles(Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenRouter's percentile cut-offs for ``preferred_*``."""

    p50: Annotated[float, Meta(ge=0)] | None = None
    p75: Annotated[float, Meta(ge=0)] | None = None
    p90: Annotated[float, Meta(ge=0)] | None = None
    p99: Annotated[float, Meta(ge=0)] | None = None


class ProviderPreferences(Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenRouter's ``provider`` routing object. What the router cannot honour
    is accepted and named in the ``x-gateway-ignored`` response header."""

    order: list[str] | None = None
    only: list[str] | None = None
    ignore: list[str] | None = None
    allow_fallbacks: bool = True
    require_parameters: bool = False
    #: ``deny``: only providers whose catalog ``data_policy`` is ``no_retention``.
    data_collection: Literal["allow", "deny"] = "allow"
    #: Only providers whose ``data_policy`` is zero data retention.
    zdr: bool | None = None
    #: Only endpoints whose catalog ``quantization`` is one of these (any case).
    quantizations: list[str] | None = None
    sort: SortBy | SortSpec | None = None
    max_price: MaxPrice | None = None
    #: Tokens per second, or percentile cut-offs (only p50 is known: the health EWMA).
    preferred_min_throughput: Annotated[float, Meta(ge=0)] | Percentiles | None = None
    #: Seconds to first token, or percentile cut-offs (only p50 is known).
    preferred_max_latency: Annotated[float, Meta(ge=0)] | Percentiles | None = None

    @property
    def sort_by(self) -> str | None:
        sort = self.sort
        return sort.by if isinstance(sort, SortSpec) else sort


class ChatRequest(Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/chat/completions``. Unknown fields are ignored, as OpenAI's
    own SDKs send new fields before gateways learn about them."""

    messages: Annotated[list[Message], Meta(min_length=1)]
    model: str | UnsetType = UNSET
    models: Annotated[list[str], Meta(max_length=16)] | UnsetType = UNSET
    provider: ProviderPreferences | UnsetType = UNSET
    stream: bool = False
    stream_options: StreamOptions | UnsetType = UNSET
    # Sampling and output controls (ranges as the seeds give them).
    temperature: Temperature | UnsetType = UNSET
    top_p: TopP | UnsetType = UNSET
    top_k: TopK | UnsetType = UNSET
    min_p: MinP | UnsetType = UNSET
    max_tokens: MaxTokens | UnsetType = UNSET
    max_completion_tokens: MaxTokens | UnsetType = UNSET
    stop: str | StopList | UnsetType | None = UNSET
    n: N | UnsetType = UNSET
    seed: int | UnsetType = UNSET
    presence_penalty: Penalty | UnsetType = UNSET
    frequency_penalty: Penalty | UnsetType = UNSET
    repetition_penalty: RepetitionPenalty | UnsetType = UNSET
    logit_bias: dict[str, Bias] | UnsetType = UNSET
    logprobs: bool | UnsetType = UNSET
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | UnsetType = UNSET
    response_format: Raw | UnsetType = UNSET
    tools: Raw | UnsetType = UNSET
    tool_choice: Raw | UnsetType = UNSET
    parallel_tool_calls: bool | UnsetType = UNSET
    user: str | UnsetType = UNSET


# The parameters an endpoint may or may not accept: every request field but
# the ones the gateway itself consumes or always forwards.
SAMPLING_PARAMETERS: tuple[str, ...] = tuple(
    f.name
    for f in msgspec.structs.fields(ChatRequest)
    if f.name not in {"messages", "model", "models", "provider", "stream", "stream_options", "max_completion_tokens"}
)

#: Parameters that change what the answer *is* (a tool call, JSON, several
#: choices, log-probabilities, where it stops): never dropped. An endpoint that
#: cannot take one as given is not a candidate. Every other parameter is a
#: pure sampling knob (temperature, top_p, top_k, min_p, penalties, seed,
#: logit_bias) or a hint (max_tokens, user) and is dropped where an endpoint
#: lacks it, named in ``x-gateway-dropped-params``; ``provider.require_parameters``
#: makes every parameter strict.
STRICT_PARAMETERS: frozenset[str] = frozenset(
    {"tools", "tool_choice", "parallel_tool_calls", "response_format", "logprobs", "top_logprobs", "n", "stop"}
)

#: Values of strict parameters that ask for nothing (OpenAI's defaults):
#: dropping them changes nothing, so they are not strict.
NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "stop": (None, [], ""),
}


# --- responses -------------------------------------------------------------

#: A harm category's severity, lowest first.
SeverityLevel = Literal["safe", "low", "medium", "high"]


class Severity(Struct, omit_defaults=False):
    filtered: bool = False
    severity: SeverityLevel = "safe"


class Detection(Struct, omit_defaults=False):
    filtered: bool = False
    detected: bool = False


class ContentFilterResults(Struct, kw_only=True):
    """Azure OpenAI's per-category result, as Novita sends it (seed 000)."""

    hate: Severity = msgspec.field(default_factory=Severity)
    self_harm: Severity = msgspec.field(default_factory=Severity)
    sexual: Severity = msgspec.field(default_factory=Severity)
    violence: Severity = msgspec.field(default_factory=Severity)
    jailbreak: Detection = msgspec.field(default_factory=Detection)
    profanity: Detection = msgspec.field(default_factory=Detection)


class PromptFilterResult(Struct):
    prompt_index: int
    content_filter_results: ContentFilterResults


class Usage(Struct, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated_cost: float | None = None


class UpstreamUsage(Struct, kw_only=True):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class AssistantMessage(Struct, kw_only=True):
    """``content`` is always sent (null when there is none), as OpenAI does;
    UNSET fields are left out."""

    role: str = "assistant"
    content: str | None = None
    tool_calls: Raw | UnsetType = UNSET
    function_call: Raw | UnsetType = UNSET
    refusal: str | UnsetType | None = UNSET
    reasoning: str | UnsetType | None = UNSET


class Choice(Struct, kw_only=True, omit_defaults=True):
    index: int = 0
    message: AssistantMessage = msgspec.field(default_factory=AssistantMessage)
    finish_reason: str | None = None
    logprobs: Raw | UnsetType | None = UNSET
    content_filter_results: Raw | UnsetType = UNSET


class ChatCompletion(Struct, kw_only=True, omit_defaults=True):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = []
    usage: UpstreamUsage | None = None
    system_fingerprint: str | UnsetType | None = UNSET


class ChoiceOut(Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    content_filter_results: ContentFilterResults
    logprobs: Raw | None = None


class ChatCompletionOut(Struct, kw_only=True):
    """What the gateway answers: OpenAI's shape plus ``provider``, cost and filter results."""

    id: str
    object: str
    created: int
    model: str
    provider: str
    choices: list[ChoiceOut]
    usage: Usage
    prompt_filter_results: list[PromptFilterResult]
    system_fingerprint: str | None = None


class Delta(Struct, kw_only=True, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    tool_calls: Raw | UnsetType = UNSET
    function_call: Raw | UnsetType = UNSET
    refusal: str | UnsetType | None = UNSET
    reasoning: str | UnsetType | None = UNSET


class ChunkChoice(Struct, kw_only=True, omit_defaults=True):
    index: int = 0
    delta: Delta = msgspec.field(default_factory=Delta)
    finish_reason: str | None = None
    logprobs: Raw | UnsetType | None = UNSET
    content_filter_results: Raw | UnsetType = UNSET


class ChatChunk(Struct, kw_only=True, omit_defaults=True):
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = []
    usage: UpstreamUsage | None = None
    system_fingerprint: str | UnsetType | None = UNSET
    error: Raw | UnsetType = UNSET


class ChunkChoiceOut(Struct, kw_only=True, omit_defaults=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: Raw | UnsetType = UNSET
    content_filter_results: ContentFilterResults | UnsetType = UNSET


class ChatChunkOut(Struct, kw_only=True, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    provider: str
    choices: list[ChunkChoiceOut]
    usage: Usage | UnsetType = UNSET
    prompt_filter_results: list[PromptFilterResult] | UnsetType = UNSET
    error: Raw | UnsetType = UNSET
