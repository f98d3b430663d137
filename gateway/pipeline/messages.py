"""Anthropic's Messages API on the chat pipeline: ``POST /v1/messages`` and
``POST /v1/messages/count_tokens``.

A request is decoded once (``protocol/messages.py``) and translated into a
chat request: ``system`` becomes one system message, ``tool_use`` blocks an
assistant message's ``tool_calls``, ``tool_result`` blocks ``tool`` messages
(placed before the rest of their user turn, as chat wants them right after
the call), images ``image_url`` parts. Routing, limits, safety, failover and
accounting then run as for chat; the answer and the stream are written back
in Anthropic's shape, the stream from byte templates, since it is written
once per relayed chunk.
"""

from __future__ import annotations

import secrets

import msgspec
from msgspec import UNSET, Raw, Struct

from gateway.errors import GatewayError, invalid_request
from gateway.limits.keys import GatewayKey
from gateway.pipeline.api import Api, Events, Exchange
from gateway.pipeline.chat import check_allowed
from gateway.pipeline.decode import check_request, decode_body
from gateway.pipeline.services import Services
from gateway.protocol import (
    ChatChunkOut,
    ChatCompletionOut,
    ChatRequest,
    ImagePart,
    ImageURL,
    Message,
    StreamOptions,
    TextPart,
    Usage,
)
from gateway.protocol.messages import (
    Base64Source,
    Block,
    ContentBlockStart,
    CountTokensOut,
    CountTokensRequest,
    DeltaUsage,
    ErrorDetail,
    ErrorOut,
    ImageBlock,
    MessageDelta,
    MessageDeltaBody,
    MessageOut,
    MessagesRequest,
    MessageStart,
    MessageUsage,
    StopReason,
    TextBlock,
    TextOut,
    Tool,
    ToolChoice,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseOut,
)
from gateway.routing.tokens import count_prompt

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"


# --- request: Anthropic -> chat --------------------------------------------------


class _Function(Struct, omit_defaults=True):
    name: str
    description: str | msgspec.UnsetType = UNSET
    parameters: Raw | msgspec.UnsetType = UNSET


class _FunctionTool(Struct, tag_field="type", tag="function"):
    function: _Function


class _CallFunction(Struct):
    name: str
    arguments: str


class _ToolCall(Struct, tag_field="type", tag="function"):
    id: str
    function: _CallFunction


class _Named(Struct):
    name: str


class _NamedChoice(Struct, tag_field="type", tag="function"):
    function: _Named


_AUTO = Raw(b'"auto"')
_REQUIRED = Raw(b'"required"')
_NONE = Raw(b'"none"')
_EMPTY_OBJECT = Raw(b"{}")


def _is_object(raw: Raw) -> bool:
    return bytes(memoryview(raw)[:1]) == b"{"  # a Raw is exactly its value's bytes


def _content(parts: list[str | Raw]) -> str | list[Raw]:
    """One text is a plain string; anything else a list of chat content parts."""
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0]
    return [Raw(msgspec.json.encode(TextPart(p))) if isinstance(p, str) else p for p in parts]


def _image_part(block: ImageBlock) -> Raw:
    source = block.source
    url = f"data:{source.media_type};base64,{source.data}" if isinstance(source, Base64Source) else source.url
    return Raw(msgspec.json.encode(ImagePart(ImageURL(url))))


def _result_text(block: ToolResultBlock, at: str) -> str:
    content = block.content
    if type(content) is str:
        text = content
    else:
        texts = []
        for k, part in enumerate(content):
            if type(part) is not TextBlock:
                raise invalid_request(
                    f"invalid content block `{at}.content[{k}]`: only text is supported in a tool_result",
                    param=f"{at}.content[{k}]",
                )
            texts.append(part.text)
        text = "\n".join(texts)
    # Chat's tool messages have no error flag: it goes in the text.
    return f"Error: {text}" if block.is_error else text


def _user(out: list[Message], blocks: list[Block], i: int) -> None:
    """Tool results become ``tool`` messages, first; the rest one user message."""
    parts: list[str | Raw] = []
    for j, block in enumerate(blocks):
        if type(block) is TextBlock:
            parts.append(block.text)
        elif type(block) is ImageBlock:
            parts.append(_image_part(block))
        elif type(block) is ToolResultBlock:
            text = _result_text(block, f"messages[{i}].content[{j}]")
            out.append(Message(role="tool", content=text, tool_call_id=block.tool_use_id))
        elif type(block) is ToolUseBlock:
            at = f"messages[{i}].content[{j}]"
            raise invalid_request(f"invalid content block `{at}`: tool_use blocks belong to assistant turns", param=at)
        # thinking blocks: dropped
    if parts:
        out.append(Message(role="user", content=_content(parts)))


def _assistant(out: list[Message], blocks: list[Block], i: int) -> None:
    """Text and tool calls make one assistant message (none, if only thinking was there)."""
    parts: list[str | Raw] = []
    calls: list[_ToolCall] = []
    for j, block in enumerate(blocks):
        if type(block) is TextBlock:
            parts.append(block.text)
        elif type(block) is ToolUseBlock:
            if not _is_object(block.input):
                at = f"messages[{i}].content[{j}].input"
                raise invalid_request(f"invalid parameter `{at}`: expected an object", param=at)
            calls.append(_ToolCall(block.id, _CallFunction(block.name, bytes(block.input).decode())))
        elif type(block) is ImageBlock or type(block) is ToolResultBlock:
            at = f"messages[{i}].content[{j}]"
            kind = "image" if type(block) is ImageBlock else "tool_result"
            raise invalid_request(f"invalid content block `{at}`: {kind} blocks belong to user turns", param=at)
    if parts or calls:
        out.append(
            Message(
                role="assistant",
                content=_content(parts) if parts else None,
                tool_calls=Raw(msgspec.json.encode(calls)) if calls else UNSET,
            )
        )


def chat_messages(request: CountTokensRequest) -> list[Message]:
    """The request's ``system`` and ``messages`` as chat messages; raises the
    400 that names a block the translation cannot take."""
    out: list[Message] = []
    system = request.system
    if system is not UNSET:
        text = system if isinstance(system, str) else "\n".join(b.text for b in system)
        if text:
            out.append(Message(role="system", content=text))
    for i, m in enumerate(request.messages):
        content = m.content
        if isinstance(content, str):
            out.append(Message(role=m.role, content=content))
        elif m.role == "user":
            _user(out, content, i)
        elif m.role == "assistant":
            _assistant(out, content, i)
        else:
            texts = []
            for j, block in enumerate(content):
                if type(block) is not TextBlock:
                    at = f"messages[{i}].content[{j}]"
                    raise invalid_request(f"invalid content block `{at}`: a system turn takes text only", param=at)
                texts.append(block.text)
            out.append(Message(role="system", content="\n".join(texts)))
    if not any(m.role != "system" for m in out):
        raise invalid_request("invalid parameter `messages`: no turn has any content to send", param="messages")
    return out


def chat_tools(tools: list[Tool]) -> Raw:
    """Client tools as chat function tools; a server tool is a 400."""
    out = []
    for i, tool in enumerate(tools):
        if tool.type not in (UNSET, None, "custom"):
            at = f"tools[{i}].type"
            raise invalid_request(
                f"invalid parameter `{at}`: server tools ({tool.type!r}) are not supported; "
                "give client tools with name, description and input_schema",
                param=at,
            )
        if tool.input_schema is UNSET or not _is_object(tool.input_schema):
            at = f"tools[{i}].input_schema"
            raise invalid_request(f"invalid parameter `{at}`: a JSON schema object is required", param=at)
        out.append(_FunctionTool(_Function(tool.name, tool.description, tool.input_schema)))
    return Raw(msgspec.json.encode(out))


def chat_tool_choice(choice: ToolChoice) -> tuple[Raw, bool]:
    """Chat's ``tool_choice``, and whether parallel tool calls are off."""
    if isinstance(choice, ToolChoiceNone):
        return _NONE, False
    if isinstance(choice, ToolChoiceAuto):
        return _AUTO, choice.disable_parallel_tool_use
    if isinstance(choice, ToolChoiceAny):
        return _REQUIRED, choice.disable_parallel_tool_use
    return Raw(msgspec.json.encode(_NamedChoice(_Named(choice.name)))), choice.disable_parallel_tool_use


def chat_request(request: MessagesRequest) -> ChatRequest:
    """The chat request that answers a message request."""
    chat = ChatRequest(
        messages=chat_messages(request),
        model=request.model,
        models=request.models,
        provider=request.provider,
        stream=request.stream,
        # Usage in a chunk of its own: the stream's message_delta carries it.
        stream_options=StreamOptions(include_usage=True) if request.stream else UNSET,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        max_tokens=request.max_tokens,
        stop=request.stop_sequences or UNSET,
    )
    if request.tools is not UNSET and request.tools:
        chat.tools = chat_tools(request.tools)
    if request.tool_choice is not UNSET:
        chat.tool_choice, serial = chat_tool_choice(request.tool_choice)
        if serial:
            chat.parallel_tool_calls = False
    if request.metadata is not UNSET and request.metadata.user_id is not None:
        chat.user = request.metadata.user_id
    return check_request(chat)


# --- answer: chat -> Anthropic ---------------------------------------------------

_STOP_REASONS: dict[str | None, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish_reason: str | None, tool_calls: bool) -> StopReason:
    """Anthropic's stop reason for a chat finish_reason. Chat's ``stop`` does
    not say whether a stop sequence matched, so it is always ``end_turn``."""
    if tool_calls and finish_reason in ("stop", "tool_calls", None):
        return "tool_use"
    return _STOP_REASONS.get(finish_reason, "end_turn")


class _FunctionIn(Struct):
    name: str = ""
    arguments: str = ""


class _CallIn(Struct):
    id: str = ""
    function: _FunctionIn = msgspec.field(default_factory=_FunctionIn)


class _RawArguments(Struct):
    _raw_arguments: str


_calls_decoder = msgspec.json.Decoder(list[_CallIn])
_object_decoder = msgspec.json.Decoder(dict[str, Raw])


def tool_input(arguments: str) -> Raw:
    """A tool call's ``arguments`` as Anthropic's ``input`` object. Empty
    arguments are ``{}``; a JSON string that holds an object (a double
    encoding some upstreams send) is that object; arguments that are not a
    JSON object are kept whole as ``{"_raw_arguments": "..."}``, so nothing is
    lost and a client's schema check fails instead of running the tool with
    made-up input."""
    text = arguments.strip()
    if not text:
        return _EMPTY_OBJECT
    try:
        _object_decoder.decode(text)
        return Raw(text.encode())
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    try:
        inner = msgspec.json.decode(text)
        if type(inner) is str:
            _object_decoder.decode(inner)
            return Raw(inner.strip().encode())
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    return Raw(msgspec.json.encode(_RawArguments(arguments)))


def _tool_uses(raw: Raw) -> list[ToolUseOut]:
    try:
        calls = _calls_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []  # not OpenAI's shape: nothing to say in Anthropic's
    return [ToolUseOut(c.id or _tool_id(), c.function.name, tool_input(c.function.arguments)) for c in calls]


def _tool_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def _usage(usage: Usage | None) -> tuple[int, int, float | None]:
    if usage is None:
        return 0, 0, None
    return usage.prompt_tokens, usage.completion_tokens, usage.estimated_cost


def message_id(request_id: str) -> str:
    """``msg_`` and the hex of the gateway's request id (``gen-<hex>``)."""
    return "msg_" + request_id.removeprefix("gen-")


class MessagesExchange:
    __slots__ = ("id", "request")

    def __init__(self, request: ChatRequest, request_id: str) -> None:
        self.request = request
        self.id = message_id(request_id)

    def answer(self, out: ChatCompletionOut) -> bytes:
        choice = out.choices[0]
        message = choice.message
        content: list[TextOut | ToolUseOut] = []
        if message.content:
            content.append(TextOut(message.content))
        elif type(message.refusal) is str and message.refusal:
            content.append(TextOut(message.refusal))
        uses = _tool_uses(message.tool_calls) if message.tool_calls is not UNSET else []
        content.extend(uses)
        usage = out.usage
        body = MessageOut(
            id=self.id,
            model=out.model,
            content=content,
            stop_reason=stop_reason(choice.finish_reason, bool(uses)),
            usage=MessageUsage(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                estimated_cost=usage.estimated_cost,
            ),
            provider=out.provider,
        )
        return msgspec.json.encode(body)

    def events(self) -> Events:
        return MessagesEvents(self.id)


# --- stream: chat chunks -> Anthropic events ---------------------------------------

PING = b'event: ping\ndata: {"type": "ping"}\n\n'
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_TEXT_START = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
    b'"content_block":{"type":"text","text":""}}\n\n'
)
_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":'
)
_JSON_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"input_json_delta","partial_json":'
)
_DELTA_END = b"}}\n\n"


class _FunctionDelta(Struct):
    name: str | None = None
    arguments: str | None = None


class _CallDelta(Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionDelta = msgspec.field(default_factory=_FunctionDelta)


_deltas_decoder = msgspec.json.Decoder(list[_CallDelta])


def _event(name: bytes, payload: Struct) -> bytes:
    return b"event: " + name + b"\ndata: " + msgspec.json.encode(payload) + b"\n\n"


class MessagesEvents:
    """One stream's events: ``message_start`` and a ``ping`` on the first
    chunk, a content block per text run or tool call (``text_delta``,
    ``input_json_delta``), then ``message_delta`` with the stop reason and
    the usage, and ``message_stop``. Only choice 0 is written (the request
    cannot ask for more)."""

    __slots__ = ("_calls", "_finish", "_id", "_next", "_open", "_started", "_text_open", "_usage")
    keepalive = PING

    def __init__(self, message_id: str) -> None:
        self._id = message_id
        self._started = False
        #: The open block's index, or -1.
        self._open = -1
        self._text_open = False
        self._next = 0
        #: Block index of each tool call, by the call's index.
        self._calls: dict[int, int] = {}
        self._finish: str | None = None
        self._usage: Usage | None = None

    def _start(self, chunk: ChatChunkOut) -> bytes:
        self._started = True
        message = MessageOut(
            id=self._id,
            model=chunk.model,
            content=[],
            stop_reason=None,
            usage=MessageUsage(input_tokens=0, output_tokens=0),  # known at the end: see message_delta
            provider=chunk.provider,
        )
        return _event(b"message_start", MessageStart(message)) + PING

    def _close(self, out: list[bytes]) -> None:
        if self._open >= 0:
            out.append(_BLOCK_STOP % self._open)
            self._open, self._text_open = -1, False

    def _text(self, out: list[bytes], text: str) -> None:
        if not self._text_open:
            self._close(out)
            self._open, self._text_open = self._next, True
            self._next += 1
            out.append(_TEXT_START % self._open)
        out.append(_TEXT_DELTA % self._open + msgspec.json.encode(text) + _DELTA_END)

    def _tools(self, out: list[bytes], raw: Raw) -> None:
        try:
            deltas = _deltas_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        for delta in deltas:
            block = self._calls.get(delta.index)
            if block is None:
                self._close(out)
                block = self._calls[delta.index] = self._open = self._next
                self._next += 1
                use = ToolUseOut(delta.id or _tool_id(), delta.function.name or "", _EMPTY_OBJECT)
                out.append(_event(b"content_block_start", ContentBlockStart(block, use)))
            if delta.function.arguments:
                out.append(_JSON_DELTA % block + msgspec.json.encode(delta.function.arguments) + _DELTA_END)

    def chunk(self, chunk: ChatChunkOut) -> bytes:
        out = [] if self._started else [self._start(chunk)]
        if chunk.usage is not UNSET:
            self._usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            text = delta.content if type(delta.content) is str else delta.refusal
            if type(text) is str and text:
                self._text(out, text)
            if delta.tool_calls is not UNSET:
                self._tools(out, delta.tool_calls)
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
        return b"".join(out)

    def done(self) -> bytes:
        out: list[bytes] = []
        self._close(out)
        prompt, completion, cost = _usage(self._usage)
        delta = MessageDelta(
            MessageDeltaBody(stop_reason(self._finish, bool(self._calls))),
            DeltaUsage(input_tokens=prompt, output_tokens=completion, estimated_cost=cost),
        )
        out.append(_event(b"message_delta", delta))
        out.append(_MESSAGE_STOP)
        return b"".join(out)

    def failed(self, chunk: ChatChunkOut, message: str) -> bytes:
        return _event(b"error", ErrorOut(ErrorDetail("api_error", message)))


# --- errors ----------------------------------------------------------------------

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",  # no provider can take it now: Anthropic's "try again shortly"
    504: "timeout_error",
    529: "overloaded_error",
}

#: Chat parameter names, as a message request says them.
_PARAMS = {
    "stop": "stop_sequences",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
    "user": "metadata.user_id",
}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(exc: GatewayError) -> bytes:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    message = exc.message
    name = _PARAMS.get(exc.param or "")
    if name is not None and exc.code == "unsupported_parameter":
        message = message.replace(f"'{exc.param}'", f"'{name}'")
    detail = ErrorDetail(error_type(exc.status), message)
    return msgspec.json.encode(ErrorOut(detail, exc.headers.get("x-request-id")))


class MessagesApi:
    """``POST /v1/messages``: Anthropic's Messages API."""

    name = "messages"
    key_headers: tuple[bytes, ...] = (b"x-api-key", b"authorization")

    async def exchange(self, gw: Services, key: GatewayKey, raw: bytes, request_id: str) -> Exchange:
        request = decode_body(raw, MessagesRequest, "message request")
        return MessagesExchange(chat_request(request), request_id)

    def error_body(self, exc: GatewayError) -> bytes:
        return error_body(exc)


MESSAGES: Api = MessagesApi()


# --- count_tokens ----------------------------------------------------------------


def count_tokens(gw: Services, key: GatewayKey, raw: bytes) -> bytes:
    """``{"input_tokens": N}``: the translated messages under the model's
    tokenizer, counted as the gateway counts a prompt it bills without the
    upstream's usage, tool definitions included."""
    request = decode_body(raw, CountTokensRequest, "count_tokens request")
    messages = chat_messages(request)
    tools = chat_tools(request.tools) if request.tools is not UNSET else None  # the same 400s as a message
    if request.model is not UNSET:
        name = request.model
    elif request.models is not UNSET and request.models:
        name = request.models[0]
    else:
        raise invalid_request("you must provide a model parameter", param="model", code="missing_model")
    model = gw.router.resolve(name)
    check_allowed(key, name, model)
    return msgspec.json.encode(CountTokensOut(count_prompt(messages, model.tokenizer, tools)))
