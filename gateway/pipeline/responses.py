"""``POST /v1/responses``: OpenAI's Responses API, translated onto the chat pipeline.

A request becomes a chat request (``instructions`` a system message first,
then the conversation of ``previous_response_id``, then ``input``; flat
function tools, ``tool_choice`` and ``text.format`` in chat's shapes), so
routing, limits, safety, failover and accounting are chat's. The answer is
written back as a Response object, or as the typed SSE events of a
Responses stream. Its id is the request id's (``gen-<hex>`` → ``resp_<hex>``),
so one id ties the response to its generation record and ``x-request-id``.

A response made with ``store`` is kept once it is complete
(``accounting/stored_responses.py``), after the answer is written: a
failed write is logged, never the request's failure.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from typing import TypeVar

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.accounting.stored_responses import ResponseStore, StoredResponse
from gateway.errors import GatewayError, invalid_request
from gateway.limits.keys import GatewayKey
from gateway.pipeline.api import KEEPALIVE, Api, Events, Exchange, OpenAIEdge
from gateway.pipeline.decode import check_request, decode_body
from gateway.pipeline.services import Services
from gateway.protocol import (
    ChatChunkOut,
    ChatCompletionOut,
    ChatRequest,
    FilePart,
    FileRef,
    Message,
    RefusalPart,
    StreamOptions,
    TextPart,
    Usage,
)
from gateway.protocol.responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    CallFunction,
    ChatFunction,
    ChatImagePart,
    ChatImageURL,
    ChatResponseFormat,
    ChatTool,
    ChatToolChoice,
    ChatToolChoiceFunction,
    Content,
    ContentPartEvent,
    Deleted,
    FunctionCall,
    IncompleteDetails,
    InputFile,
    InputImage,
    InputItem,
    InputPart,
    InputRefusal,
    InputText,
    JsonSchema,
    LifecycleEvent,
    OutputContent,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextPart,
    ResponseEcho,
    ResponseError,
    ResponseHead,
    ResponsesRequest,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
    TextFormat,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoiceObject,
)
from gateway.protocol.responses import RefusalPart as OutputRefusalPart

log = logging.getLogger("gateway")

RESPONSES_PATH = "/v1/responses"

_T = TypeVar("_T")
_encode = msgspec.json.Encoder().encode
_tool_calls = msgspec.json.Decoder(list[ToolCallDelta])

_NO_TOOLS = Raw(b"[]")
_AUTO = Raw(b'"auto"')
_TEXT = Raw(b'{"format":{"type":"text"}}')

#: Chat's names for what a Responses request calls otherwise, for errors the
#: pipeline raises after the translation (an unsupported parameter, a filtered prompt).
_RENAMED = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


# --- request ---------------------------------------------------------------------


def _unset(value: _T | None) -> _T | UnsetType:
    return UNSET if value is None else value


def _missing(param: str) -> GatewayError:
    return invalid_request(f"missing required parameter `{param}`", param=param, code="missing_required_parameter")


def _required(value: str | UnsetType, param: str) -> str:
    if value is UNSET:
        raise _missing(param)
    return value


def _part(part: InputPart, param: str) -> Raw:
    """One input content part as a chat content part."""
    if isinstance(part, InputText | OutputText):
        return Raw(_encode(TextPart(part.text)))
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise invalid_request("an input_image needs an image_url here (file ids are not supported)", param=param)
        return Raw(_encode(ChatImagePart(ChatImageURL(part.image_url, part.detail))))
    if isinstance(part, InputFile):
        if part.file_url is not None:
            raise invalid_request("an input_file by file_url is not supported", param=f"{param}.file_url")
        ref = FileRef(file_data=_unset(part.file_data), file_id=_unset(part.file_id), filename=_unset(part.filename))
        return Raw(_encode(FilePart(ref)))
    return Raw(_encode(RefusalPart(part.refusal)))


def _content(content: Content, param: str) -> str | list[Raw]:
    """Message content: a string as it is, one text part as its text, more as chat parts."""
    if isinstance(content, str):
        return content
    first = content[0] if len(content) == 1 else None
    if isinstance(first, InputText | OutputText):
        return first.text
    return [_part(p, f"{param}[{j}]") for j, p in enumerate(content)]


def _assistant_text(content: Content, param: str) -> str | None:
    """An assistant message's text: its text (and refusal) parts, joined."""
    if isinstance(content, str):
        return content
    texts = []
    for j, p in enumerate(content):
        if isinstance(p, InputText | OutputText):
            texts.append(p.text)
        elif isinstance(p, InputRefusal):
            texts.append(p.refusal)
        else:
            raise invalid_request("an assistant message takes only text parts", param=f"{param}[{j}].type")
    return "".join(texts) if texts else None


def _tool_output(content: Content, param: str) -> str | list[Raw]:
    if isinstance(content, str):
        return content
    for j, p in enumerate(content):
        if not isinstance(p, InputText | OutputText):
            raise invalid_request("a function_call_output takes only text parts", param=f"{param}[{j}].type")
    return _content(content, param)


def input_messages(items: str | list[InputItem] | UnsetType) -> list[Message]:
    """``input`` as chat messages. Function calls become the ``tool_calls`` of
    the assistant message they follow (or of one of their own); their
    outputs become tool messages."""
    if isinstance(items, str):
        return [Message(role="user", content=items)]
    if items is UNSET:
        return []
    out: list[Message] = []
    calls: list[ToolCall] = []  # of out[-1], an assistant message
    for i, item in enumerate(items):
        at = f"input[{i}]"
        if item.type == "function_call":
            call = ToolCall(
                id=_required(item.call_id, f"{at}.call_id"),
                function=CallFunction(_required(item.name, f"{at}.name"), _required(item.arguments, f"{at}.arguments")),
            )
            if not out or out[-1].role != "assistant" or out[-1].tool_calls is not UNSET:
                _flush(out, calls)
                out.append(Message(role="assistant", content=None))
            calls.append(call)
            continue
        _flush(out, calls)
        if item.type == "function_call_output":
            call_id = _required(item.call_id, f"{at}.call_id")
            if item.output is UNSET:
                raise _missing(f"{at}.output")
            out.append(Message(role="tool", tool_call_id=call_id, content=_tool_output(item.output, f"{at}.output")))
            continue
        if item.role is UNSET:
            raise _missing(f"{at}.role")
        if item.content is UNSET:
            raise _missing(f"{at}.content")
        if item.role == "assistant":
            out.append(Message(role="assistant", content=_assistant_text(item.content, f"{at}.content")))
        else:
            out.append(Message(role=item.role, content=_content(item.content, f"{at}.content")))
    _flush(out, calls)
    return out


def _flush(out: list[Message], calls: list[ToolCall]) -> None:
    """Give the assistant message being built the calls that followed it."""
    if calls:
        out[-1].tool_calls = Raw(_encode(calls))
        calls.clear()


def _tools(tools: list[Tool]) -> Raw:
    chat = []
    for i, t in enumerate(tools):
        if t.type != "function":
            raise invalid_request(
                f"tool type {t.type!r} is not supported; the gateway serves function tools only",
                param=f"tools[{i}].type",
                code="unsupported_value",
            )
        name = _required(t.name, f"tools[{i}].name")
        function = ChatFunction(name=name, description=t.description, parameters=t.parameters, strict=t.strict)
        chat.append(ChatTool(function=function))
    return Raw(_encode(chat))


def _tool_choice(choice: str | ToolChoiceObject) -> Raw:
    if isinstance(choice, str):
        return Raw(_encode(choice))
    if choice.type != "function":
        raise invalid_request(
            f"tool_choice type {choice.type!r} is not supported; use auto, none, required or a function",
            param="tool_choice.type",
            code="unsupported_value",
        )
    name = _required(choice.name, "tool_choice.name")
    return Raw(_encode(ChatToolChoice(function=ChatToolChoiceFunction(name))))


def _response_format(req: ResponsesRequest) -> Raw | UnsetType:
    fmt = req.text.format if req.text is not None else UNSET
    if fmt is UNSET or fmt.type == "text":
        return UNSET
    if fmt.type == "json_object":
        return Raw(_encode(ChatResponseFormat(type="json_object")))
    if fmt.schema is UNSET:
        raise _missing("text.format.schema")
    schema = JsonSchema(
        name=_required(fmt.name, "text.format.name"),
        schema=fmt.schema,
        description=fmt.description,
        strict=fmt.strict,
    )
    return Raw(_encode(ChatResponseFormat(type="json_schema", json_schema=schema)))


def translate(req: ResponsesRequest, previous: Sequence[Message]) -> tuple[ChatRequest, list[Message]]:
    """The chat request, and the conversation it continues (without the
    instructions: OpenAI does not carry them over to the next response)."""
    conversation = [*previous, *input_messages(req.input)]
    if not conversation:
        raise _missing("input")
    messages = conversation
    if req.instructions:
        messages = [Message(role="system", content=req.instructions), *conversation]
    tools: Raw | UnsetType = UNSET
    tool_choice: Raw | UnsetType = UNSET
    if req.tools:
        tools = _tools(req.tools)
        if req.tool_choice is not None:
            tool_choice = _tool_choice(req.tool_choice)
    elif req.tool_choice not in (None, "auto", "none"):
        raise invalid_request("tool_choice asks for a tool, and there are no tools", param="tool_choice")
    chat = ChatRequest(
        messages=messages,
        model=req.model,
        models=req.models,
        provider=req.provider,
        stream=req.stream,
        stream_options=StreamOptions(include_usage=True) if req.stream else UNSET,
        temperature=_unset(req.temperature),
        top_p=_unset(req.top_p),
        max_tokens=_unset(req.max_output_tokens),
        response_format=_response_format(req),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=_unset(req.parallel_tool_calls),
        user=_unset(req.user),
    )
    return check_request(chat), conversation


def _echo(req: ResponsesRequest) -> bytes:
    """The request's settings as every response object of it repeats them."""
    text = _TEXT
    if req.text is not None:
        config = req.text
        if config.format is UNSET:
            config = msgspec.structs.replace(config, format=TextFormat(type="text"))
        text = Raw(_encode(config))
    return _encode(
        ResponseEcho(
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id,
            store=req.store is not False,
            temperature=req.temperature,
            top_p=req.top_p,
            text=text,
            tool_choice=_AUTO if req.tool_choice is None else Raw(_encode(req.tool_choice)),
            tools=Raw(_encode(req.tools)) if req.tools else _NO_TOOLS,
            metadata=req.metadata or {},
            user=req.user,
        )
    )


# --- answer ----------------------------------------------------------------------


def _status(finish_reason: str | None) -> tuple[str, IncompleteDetails | None]:
    if finish_reason == "length":
        return "incomplete", IncompleteDetails("max_output_tokens")
    if finish_reason == "content_filter":
        return "incomplete", IncompleteDetails("content_filter")
    return "completed", None


def _usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        estimated_cost=usage.estimated_cost,
    )


def _assistant(text: str | None, calls: list[FunctionCall]) -> Message:
    """The answer as the chat message a later turn continues from."""
    message = Message(role="assistant", content=text)
    if calls:
        message.tool_calls = Raw(_encode([ToolCall(c.call_id, CallFunction(c.name, c.arguments)) for c in calls]))
    return message


def _kept(response_id: str, future: asyncio.Future[object]) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        log.warning("stored response %s not written (%s)", response_id, type(exc).__name__)


def _put(store: ResponseStore, response_id: str, record: StoredResponse) -> None:
    try:
        pending = store.put_soon(response_id, record)
    except Exception as exc:  # noqa: BLE001 - a lost record must not fail anything else
        log.warning("stored response %s not written (%s)", response_id, type(exc).__name__)
        return
    if pending is not None:
        pending.add_done_callback(functools.partial(_kept, response_id))


class ResponsesExchange:
    """One Responses request: its chat request, and the response object it writes."""

    __slots__ = ("_conversation", "_created", "_echo", "_hex", "_key", "_store", "id", "request")

    def __init__(
        self,
        request: ChatRequest,
        conversation: list[Message],
        echo: bytes,
        request_id: str,
        store: ResponseStore | None,
        key: str,
    ) -> None:
        self.request = request
        self._conversation = conversation
        self._echo = echo
        self._hex = request_id.partition("-")[2] or request_id
        self.id = "resp_" + self._hex
        self._created = int(time.time())
        self._store = store
        self._key = key

    def item_id(self, prefix: str, output_index: int) -> str:
        return f"{prefix}_{self._hex}" if output_index == 0 else f"{prefix}_{self._hex}_{output_index}"

    def body(
        self,
        status: str,
        model: str,
        provider: str,
        output: list[OutputItem],
        usage: Usage | None = None,
        incomplete: IncompleteDetails | None = None,
        error: ResponseError | None = None,
    ) -> bytes:
        head = ResponseHead(
            id=self.id,
            created_at=self._created,
            status=status,
            error=error,
            incomplete_details=incomplete,
            model=model,
            provider=provider,
            output=output,
            usage=None if usage is None else _usage(usage),
        )
        return _encode(head)[:-1] + b"," + self._echo[1:]

    def keep(self, body: bytes, text: str | None, calls: list[FunctionCall]) -> None:
        """Store the complete response, once the answer is written."""
        if self._store is not None:
            record = StoredResponse(
                key=self._key, messages=[*self._conversation, _assistant(text, calls)], response=Raw(body)
            )
            asyncio.get_running_loop().call_soon(_put, self._store, self.id, record)

    def answer(self, out: ChatCompletionOut) -> bytes:
        choice = out.choices[0]
        message = choice.message
        status, incomplete = _status(choice.finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        output: list[OutputItem] = []
        pieces: list[ToolCallDelta] = []
        if message.tool_calls is not UNSET:
            try:
                pieces = _tool_calls.decode(message.tool_calls)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pieces = []  # the attempt made them OpenAI-shaped: not expected
        content: list[OutputContent] = []
        if message.content or not (message.refusal or pieces):
            content.append(OutputTextPart(message.content or ""))
        if message.refusal:
            content.append(OutputRefusalPart(message.refusal))
        if content:
            output.append(OutputMessage(id=self.item_id("msg", 0), status=item_status, content=content))
        calls = []
        for piece in pieces:
            n, fn = len(output), piece.function
            call = FunctionCall(
                id=self.item_id("fc", n),
                call_id=piece.id or self.item_id("call", n),
                name=(fn.name if fn else None) or "",
                arguments=(fn.arguments if fn else None) or "",
                status=item_status,
            )
            calls.append(call)
            output.append(call)
        body = self.body(status, out.model, out.provider, output, out.usage, incomplete)
        self.keep(body, message.content, calls)
        return body

    def events(self) -> Events:
        return ResponsesEvents(self)


# --- stream ----------------------------------------------------------------------


def _prefix(kind: str) -> bytes:
    return f"event: {kind}\ndata: ".encode()


_CREATED = "response.created"
_IN_PROGRESS = "response.in_progress"
_COMPLETED = "response.completed"
_INCOMPLETE = "response.incomplete"
_FAILED = "response.failed"
_ITEM_ADDED = "response.output_item.added"
_ITEM_DONE = "response.output_item.done"
_PART_ADDED = "response.content_part.added"
_PART_DONE = "response.content_part.done"
_TEXT_DELTA = "response.output_text.delta"
_TEXT_DONE = "response.output_text.done"
_ARGS_DELTA = "response.function_call_arguments.delta"
_ARGS_DONE = "response.function_call_arguments.done"
_PREFIXES = {
    k: _prefix(k)
    for k in (
        _CREATED,
        _IN_PROGRESS,
        _COMPLETED,
        _INCOMPLETE,
        _FAILED,
        _ITEM_ADDED,
        _ITEM_DONE,
        _PART_ADDED,
        _PART_DONE,
        _TEXT_DELTA,
        _TEXT_DONE,
        _ARGS_DELTA,
        _ARGS_DONE,
    )
}
_END = b"\n\n"


class _Text:
    __slots__ = ("item_id", "output_index", "parts")

    def __init__(self, item_id: str, output_index: int) -> None:
        self.item_id = item_id
        self.output_index = output_index
        self.parts: list[str] = []


class _Call:
    __slots__ = ("call_id", "item_id", "name", "output_index", "parts")

    def __init__(self, item_id: str, output_index: int, call_id: str, name: str) -> None:
        self.item_id = item_id
        self.output_index = output_index
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []

    def item(self, status: str) -> FunctionCall:
        return FunctionCall(
            id=self.item_id, call_id=self.call_id, name=self.name, arguments="".join(self.parts), status=status
        )


class ResponsesEvents:
    """One stream's typed events, written from the relayed chat chunks (choice 0).

    ``response.created`` and ``response.in_progress`` go out with the first
    chunk; a message item opens at the first text, a function call item at
    each call's first piece (closing the message before it); every open
    item is closed when the choice finishes, and ``response.completed`` (or
    ``response.incomplete``) follows the usage at the end.
    """

    keepalive = KEEPALIVE

    def __init__(self, exchange: ResponsesExchange) -> None:
        self.x = exchange
        self.seq = 0
        self.started = False
        self.model = ""
        self.provider = ""
        #: Output items by output index; None while open.
        self.items: list[OutputItem | None] = []
        self.text: _Text | None = None
        self.calls: dict[int, _Call] = {}
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.answer_text: list[str] = []
        self.done_calls: list[FunctionCall] = []

    def _event(self, kind: str, event: msgspec.Struct) -> bytes:
        self.seq += 1
        return _PREFIXES[kind] + _encode(event) + _END

    def _lifecycle(self, kind: str, body: bytes) -> bytes:
        return self._event(kind, LifecycleEvent(kind, self.seq, Raw(body)))

    def _start(self, chunk: ChatChunkOut, out: list[bytes]) -> None:
        self.started = True
        self.model, self.provider = chunk.model, chunk.provider
        body = self.x.body("in_progress", self.model, self.provider, [])
        out.append(self._lifecycle(_CREATED, body))
        out.append(self._lifecycle(_IN_PROGRESS, body))

    def chunk(self, chunk: ChatChunkOut) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(chunk, out)
        if chunk.usage is not UNSET:
            self.usage = chunk.usage
        for c in chunk.choices:
            if c.index != 0:
                continue
            delta = c.delta
            if type(delta.content) is str and delta.content:
                self._text_delta(delta.content, out)
            if delta.tool_calls is not UNSET:
                self._call_deltas(delta.tool_calls, out)
            if c.finish_reason is not None:
                self.finish_reason = c.finish_reason
                self._close_all(out)
        return b"".join(out)

    def _open_text(self, out: list[bytes]) -> _Text:
        index = len(self.items)
        text = self.text = _Text(self.x.item_id("msg", index), index)
        self.items.append(None)
        item = OutputMessage(id=text.item_id, status="in_progress", content=[])
        out.append(self._event(_ITEM_ADDED, OutputItemEvent(_ITEM_ADDED, self.seq, index, item)))
        part = ContentPartEvent(_PART_ADDED, self.seq, text.item_id, index, 0, OutputTextPart(""))
        out.append(self._event(_PART_ADDED, part))
        return text

    def _text_delta(self, delta: str, out: list[bytes]) -> None:
        text = self.text or self._open_text(out)
        text.parts.append(delta)
        event = TextDeltaEvent(_TEXT_DELTA, self.seq, text.item_id, text.output_index, 0, delta)
        out.append(self._event(_TEXT_DELTA, event))

    def _call_deltas(self, raw: Raw, out: list[bytes]) -> None:
        try:
            pieces = _tool_calls.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # the relay normalized them; nothing else reaches here
        for piece in pieces:
            call = self.calls.get(piece.index)
            fn = piece.function
            if call is None:
                self._close_text(out, "completed")
                index = len(self.items)
                call_id = piece.id or self.x.item_id("call", index)
                call = self.calls[piece.index] = _Call(
                    self.x.item_id("fc", index), index, call_id, (fn.name if fn else None) or ""
                )
                self.items.append(None)
                item = call.item("in_progress")
                out.append(self._event(_ITEM_ADDED, OutputItemEvent(_ITEM_ADDED, self.seq, index, item)))
            arguments = fn.arguments if fn else None
            if arguments:
                call.parts.append(arguments)
                event = ArgumentsDeltaEvent(_ARGS_DELTA, self.seq, call.item_id, call.output_index, arguments)
                out.append(self._event(_ARGS_DELTA, event))

    def _close_text(self, out: list[bytes], status: str) -> None:
        text, self.text = self.text, None
        if text is None:
            return
        whole = "".join(text.parts)
        self.answer_text.append(whole)
        i, item_id = text.output_index, text.item_id
        out.append(self._event(_TEXT_DONE, TextDoneEvent(_TEXT_DONE, self.seq, item_id, i, 0, whole)))
        part = OutputTextPart(whole)
        out.append(self._event(_PART_DONE, ContentPartEvent(_PART_DONE, self.seq, item_id, i, 0, part)))
        item = self.items[i] = OutputMessage(id=item_id, status=status, content=[part])
        out.append(self._event(_ITEM_DONE, OutputItemEvent(_ITEM_DONE, self.seq, i, item)))

    def _close_all(self, out: list[bytes]) -> None:
        status = "completed" if _status(self.finish_reason)[0] == "completed" else "incomplete"
        self._close_text(out, status)
        for call in self.calls.values():
            arguments = "".join(call.parts)
            done = ArgumentsDoneEvent(_ARGS_DONE, self.seq, call.item_id, call.output_index, call.name, arguments)
            out.append(self._event(_ARGS_DONE, done))
            item = self.items[call.output_index] = call.item(status)
            self.done_calls.append(item)
            out.append(self._event(_ITEM_DONE, OutputItemEvent(_ITEM_DONE, self.seq, call.output_index, item)))
        self.calls.clear()

    def done(self) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(ChatChunkOut(id="", object="", created=0, model="", provider="", choices=[]), out)
        self._close_all(out)
        status, incomplete = _status(self.finish_reason)
        if not self.items:  # an empty answer is still a message, whose output_text is ""
            self._open_text(out)
            self._close_text(out, "completed" if status == "completed" else "incomplete")
        output = [i for i in self.items if i is not None]
        body = self.x.body(status, self.model, self.provider, output, self.usage, incomplete)
        out.append(self._lifecycle(_COMPLETED if status == "completed" else _INCOMPLETE, body))
        self.x.keep(body, "".join(self.answer_text) if self.answer_text else None, self.done_calls)
        return b"".join(out)

    def failed(self, chunk: ChatChunkOut, message: str) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(chunk, out)
        opened: dict[int, OutputItem] = {c.output_index: c.item("incomplete") for c in self.calls.values()}
        if self.text is not None:
            part = OutputTextPart("".join(self.text.parts))
            opened[self.text.output_index] = OutputMessage(id=self.text.item_id, status="incomplete", content=[part])
        output = [item if item is not None else opened[i] for i, item in enumerate(self.items)]
        error = ResponseError("server_error", message)
        body = self.x.body("failed", self.model, self.provider, output, self.usage, error=error)
        out.append(self._lifecycle(_FAILED, body))
        return b"".join(out)


# --- the API ---------------------------------------------------------------------


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(
        404, f"Response with id '{response_id}' not found.", code="response_not_found", param="response_id"
    )


def _unavailable() -> GatewayError:
    return GatewayError(503, "the response store is unavailable; try again shortly", code="store_unavailable")


async def _stored(gw: Services, key: GatewayKey, response_id: str) -> StoredResponse | None:
    """The stored response, if this key may see it (open mode sees all)."""
    try:
        stored = await gw.responses.get(response_id)
    except Exception as exc:  # noqa: BLE001 - the store is down: say so, without its details
        log.warning("stored response %s not read (%s)", response_id, type(exc).__name__)
        raise _unavailable() from None
    if stored is None or (not gw.keys.open and stored.key != key.name):
        return None
    return stored


async def retrieve(gw: Services, key: GatewayKey, response_id: str) -> bytes:
    """``GET /v1/responses/{id}``: the response object as it was sent."""
    stored = await _stored(gw, key, response_id)
    if stored is None:
        raise _not_found(response_id)
    return bytes(stored.response)


async def delete(gw: Services, key: GatewayKey, response_id: str) -> bytes:
    """``DELETE /v1/responses/{id}``, in OpenAI's shape."""
    if await _stored(gw, key, response_id) is None:
        raise _not_found(response_id)
    try:
        deleted = await gw.responses.delete(response_id)
    except Exception as exc:  # noqa: BLE001 - the store is down: say so, without its details
        log.warning("stored response %s not deleted (%s)", response_id, type(exc).__name__)
        raise _unavailable() from None
    if not deleted:
        raise _not_found(response_id)
    return _encode(Deleted(response_id))


class ResponsesApi(OpenAIEdge):
    """``POST /v1/responses``."""

    async def exchange(self, gw: Services, key: GatewayKey, raw: bytes, request_id: str) -> Exchange:
        req = decode_body(raw, ResponsesRequest, "responses request")
        previous: list[Message] = []
        if req.previous_response_id is not None:
            stored = await _stored(gw, key, req.previous_response_id)
            if stored is None:
                raise invalid_request(
                    f"Previous response with id '{req.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            previous = stored.messages
        chat, conversation = translate(req, previous)
        store = gw.responses if req.store is not False else None
        return ResponsesExchange(chat, conversation, _echo(req), request_id, store, key.name)

    def error_body(self, exc: GatewayError) -> bytes:
        param = exc.param
        renamed = _RENAMED.get(param) if param is not None else None
        if renamed is None:
            return exc.to_json()
        message = exc.message.replace(f"'{param}'", f"'{renamed}'")
        return GatewayError(exc.status, message, code=exc.code, param=renamed, type=exc.type).to_json()


RESPONSES: Api = ResponsesApi("responses")
