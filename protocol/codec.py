"""Bytes <-> messages, with every malformed input turned into a :class:`ProtocolError`.

The decoder runs the checks of PROTOCOL.md section 3 in order: ``bad_frame`` (not one
MessagePack map with string keys and a string ``type``, or beyond the structural bounds of
section 1), ``unknown_type``, then ``invalid_request`` naming the first offending field as a
dotted path.

What decoding a client frame may cost. A frame of up to ``limits.max_message_bytes``
(64 MiB) can hold tens of millions of one-byte values, and Python objects for them would
take 50 to 100 times the frame's size. So the client decoder never builds what validation
does not need, and never does more than a slice of work at a time:

1. One pass over the whole frame checks its structure while msgpack decodes it: msgpack's
   own limits reject a list or map of more than 256 entries and every extension type, and
   hooks replace each finished list or map by a marker of how deep it nests (raising as
   soon as that passes 32 levels). Only the scalars of the containers still open are alive
   at any time, and every container has at most 256 entries.
2. Only the maps and lists where a message model expects one (``params``, ``preview``,
   ``output``, ``params.loras`` and its items) are read again and built, from the last
   occurrence of their key. Any other list or map becomes an empty stand-in of its kind:
   the validator rejects it with the very error it would give the original, since a wrong
   type or an unknown key does not depend on what is inside. A list with more items than
   its field allows is not read at all (the validator checks the length first).

Both passes feed the frame to msgpack :data:`DECODE_STEP_BYTES` at a time, and
:func:`decode_client_message_in_steps` yields after each step, so that a server can let
other work run while it decodes a large frame. Memory stays within a few times the frame's
size; the work is proportional to it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import QUOTE_LIMIT, BadFrame, InvalidRequest, UnknownType, quoted
from .limits import MAX_CONTAINER_ENTRIES, MAX_NESTING_DEPTH
from .messages import CLIENT_MESSAGE_TYPES, ClientMessage, ServerMessage, SubmitRules

T = TypeVar("T")

#: A decoding in progress: each ``next()`` does a bounded slice of the work, and the
#: generator returns the result (or raises a ProtocolError).
Steps = Generator[None, None, T]

#: How many bytes of a frame the decoder hands to msgpack between two yields. At worst
#: (a byte per list or map) msgpack and the hooks take about 100 ns a byte: 1.6 ms a step.
DECODE_STEP_BYTES = 16 * 1024
#: While msgpack waits for the rest of one long string or bin (it builds the value only
#: once it has all of it), the steps double up to this size: copying is all they do.
_MAX_FEED_BYTES = 8 * 2**20

_SERVER_MESSAGE = TypeAdapter[ServerMessage](ServerMessage)

_TOO_MANY_ENTRIES = (
    f"a list or map has more than {MAX_CONTAINER_ENTRIES} entries; no valid message needs more"
)
_TOO_DEEP = f"values nested deeper than {MAX_NESTING_DEPTH} levels; no valid message needs more"
_EXTENSION = "MessagePack extension types are not used"
_TRUNCATED = "the frame ends inside a MessagePack value"


# --------------------------------------------------------------------------- structure


class _Container:
    """What the checking pass keeps of a finished list or map: its kind and how deep it
    nests (0 for an empty one, 1 for one holding scalars, ...)."""

    __slots__ = ("depth", "kind")

    def __init__(self, kind: str, depth: int) -> None:
        self.kind = kind
        self.depth = depth


_ARRAYS = tuple(_Container("an array", depth) for depth in range(MAX_NESTING_DEPTH + 1))
_MAPS = tuple(_Container("a map", depth) for depth in range(MAX_NESTING_DEPTH + 1))


# The hooks run once per list or map, from C: plain loops are the fastest way to look at
# up to 256 values here (faster than set(map(type, ...)) for small and large containers).


def _array_done(items: list[Any]) -> _Container:
    depth = 1 if items else 0
    for item in items:
        if type(item) is _Container and item.depth >= depth:
            depth = item.depth + 1
    if depth > MAX_NESTING_DEPTH:
        raise BadFrame(_TOO_DEEP)
    return _ARRAYS[depth]


def _map_done(pairs: list[tuple[Any, Any]]) -> _Container:
    depth = 1 if pairs else 0
    for key, value in pairs:
        # strict_map_key has let through only str and bin keys.
        if type(key) is bytes:
            raise BadFrame("map keys must be strings, got bin")
        if type(value) is _Container and value.depth >= depth:
            depth = value.depth + 1
    if depth > MAX_NESTING_DEPTH:
        raise BadFrame(_TOO_DEEP)
    return _MAPS[depth]


def _reject_extension(code: int, data: bytes) -> Any:
    raise BadFrame(f"{_EXTENSION} (extension type {code})")


_KEY_TYPES = {
    "int": "an integer",
    "float": "a float",
    "bool": "a boolean",
    "NoneType": "nil",
    "_Container": "an array or a map",
}


def _bad_frame(exc: Exception) -> BadFrame:
    """The BadFrame for what msgpack raised."""
    text = str(exc)
    if isinstance(exc, msgpack.StackError):
        return BadFrame(_TOO_DEEP)
    if "exceeds max_array_len" in text or "exceeds max_map_len" in text:
        return BadFrame(_TOO_MANY_ENTRIES)
    if "exceeds max_ext_len" in text or "timestamp" in text:
        return BadFrame(_EXTENSION)
    if "is not allowed for map key" in text:
        kind = text.split(" ", 1)[0]
        return BadFrame(f"map keys must be strings, got {_KEY_TYPES.get(kind, kind)}")
    if isinstance(exc, UnicodeDecodeError):
        return BadFrame("a string is not valid UTF-8")
    return BadFrame(f"not one well-formed MessagePack value ({exc})")


def _is_map(first_byte: int) -> bool:
    return 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF)


def _is_container(first_byte: int) -> bool:
    return 0x80 <= first_byte <= 0x9F or 0xDC <= first_byte <= 0xDF


class _Reader:
    """MessagePack values from ``view[start:end]``, given to msgpack a step at a time.

    Every read is a generator: it yields each time msgpack needs more of the frame (after
    feeding it the next :data:`DECODE_STEP_BYTES`), and msgpack resumes where it stopped.
    """

    def __init__(self, view: memoryview, start: int, end: int) -> None:
        self._view = view
        self._start = start
        self._end = end
        size = max(end - start, 1)
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=True,
            list_hook=_array_done,
            object_pairs_hook=_map_done,
            ext_hook=_reject_extension,
            read_size=min(size, DECODE_STEP_BYTES),
            # Strings and bin are bounded by the frame (msgpack's default for both).
            max_buffer_size=size,
            max_array_len=MAX_CONTAINER_ENTRIES,
            max_map_len=MAX_CONTAINER_ENTRIES,
            max_ext_len=0,
        )
        self._fed = start
        self._step = DECODE_STEP_BYTES
        self._fed_at = -1
        self._feed()

    def _feed(self) -> None:
        position = self.position
        if position == self._fed_at:
            # Nothing was read since the last step: msgpack waits for a long string or bin.
            self._step = min(2 * self._step, _MAX_FEED_BYTES)
        else:
            self._step = DECODE_STEP_BYTES
        self._fed_at = position
        stop = min(self._fed + self._step, self._end)
        self._unpacker.feed(self._view[self._fed : stop])
        self._fed = stop

    @property
    def position(self) -> int:
        """Offset in the frame of the next byte to read."""
        return self._start + self._unpacker.tell()

    def peek(self) -> int:
        """The first byte of the next value."""
        position = self.position
        if position >= self._end:
            raise BadFrame(_TRUNCATED)
        return self._view[position]

    def at_end(self) -> bool:
        return self.position >= self._end

    def _run(self, read: Callable[[], T]) -> Steps[T]:
        while True:
            try:
                return read()
            except msgpack.OutOfData:
                if self._fed >= self._end:
                    raise BadFrame(_TRUNCATED) from None
            except BadFrame:
                raise
            except Exception as exc:  # noqa: BLE001 (msgpack raises several types for bad input)
                raise _bad_frame(exc) from None
            self._feed()
            yield

    def value(self) -> Steps[Any]:
        """The next value; a list or map comes back as a :class:`_Container`."""
        return self._run(self._unpacker.unpack)

    def skip(self) -> Steps[None]:
        return self._run(self._unpacker.skip)

    def map_header(self) -> Steps[int]:
        return self._run(self._unpacker.read_map_header)

    def array_header(self) -> Steps[int]:
        return self._run(self._unpacker.read_array_header)


#: key -> (start, end, is a map) of a list or map value in the frame (its last occurrence).
_Spans = dict[str, tuple[int, int, bool]]


def _read_entries(
    reader: _Reader, count: int, *, check: bool
) -> Steps[tuple[dict[str, Any], _Spans]]:
    """The entries of a map whose header has been read: scalars as they are, lists and
    maps as empty stand-ins whose spans are returned. With ``check``, this is the top-level
    map of a frame that has not been checked yet (a nested map's keys and depth are checked
    by msgpack and the hooks)."""
    if count > MAX_CONTAINER_ENTRIES:
        raise BadFrame(_TOO_MANY_ENTRIES)
    values: dict[str, Any] = {}
    spans: _Spans = {}
    for _ in range(count):
        key = yield from reader.value()
        if type(key) is not str:
            raise BadFrame(f"map keys must be strings, got {_wire_type(key)}")
        first = reader.peek()
        if _is_container(first):
            start = reader.position
            if check:
                container = yield from reader.value()
                # The map's values are one level down: the deepest value inside this one
                # is container.depth levels further.
                if 1 + container.depth > MAX_NESTING_DEPTH:
                    raise BadFrame(_TOO_DEEP)
            else:
                yield from reader.skip()
            is_map = _is_map(first)
            values[key] = {} if is_map else []
            spans[key] = (start, reader.position, is_map)
        else:
            values[key] = yield from reader.value()
            spans.pop(key, None)
    return values, spans


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _MapShape:
    """A field (or message) that takes a map: the shapes of its fields."""

    fields: Mapping[str, _Shape]


@dataclass(frozen=True)
class _ListShape:
    """A field that takes a list: the shape of its items and its maximum length."""

    items: _Shape
    max_items: int | None


#: None: a scalar field (a list or map there is rejected whatever it holds).
_Shape = _MapShape | _ListShape | None


def _shape_of_model(model: type[BaseModel]) -> _MapShape:
    return _MapShape(
        {
            name: _shape_of(info.annotation, list(info.metadata))
            for name, info in model.model_fields.items()
        }
    )


def _shape_of(annotation: Any, metadata: list[Any]) -> _Shape:
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *more = get_args(annotation)
        return _shape_of(inner, [*metadata, *more])
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(options) == 1:
            return _shape_of(options[0], metadata)
    elif origin is Literal:
        return None
    elif origin is list:
        (item,) = get_args(annotation)
        lengths = [getattr(entry, "max_length", None) for entry in metadata]
        max_items = min((length for length in lengths if length is not None), default=None)
        return _ListShape(_shape_of(item, []), max_items)
    elif isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return _shape_of_model(annotation)
        if annotation in (str, int, float, bool, bytes):
            return None
    # Reading only the parts a model needs relies on knowing them: teach this function
    # the new kind of field rather than let a stand-in reach the validator.
    raise TypeError(f"the client decoder cannot read a field of type {annotation!r}")


_CLIENT_SHAPES = {model: _shape_of_model(model) for model in CLIENT_MESSAGE_TYPES.values()}


def _read_container(
    view: memoryview, start: int, end: int, shape: _Shape, is_map: bool
) -> Steps[Any]:
    """The list or map at ``view[start:end]`` as the validator needs it for ``shape``."""
    if isinstance(shape, _MapShape) and is_map:
        reader = _Reader(view, start, end)
        count = yield from reader.map_header()
        values, spans = yield from _read_entries(reader, count, check=False)
        del reader  # its buffer
        yield from _read_fields(view, values, spans, shape)
        return values
    if isinstance(shape, _ListShape) and not is_map:
        return (yield from _read_list(view, start, end, shape))
    return {} if is_map else []


def _read_fields(
    view: memoryview, values: dict[str, Any], spans: _Spans, shape: _MapShape
) -> Steps[None]:
    for key, (start, end, is_map) in spans.items():
        field_shape = shape.fields.get(key)
        if field_shape is not None:
            values[key] = yield from _read_container(view, start, end, field_shape, is_map)


def _read_list(view: memoryview, start: int, end: int, shape: _ListShape) -> Steps[list[Any]]:
    reader = _Reader(view, start, end)
    count = yield from reader.array_header()
    if shape.max_items is not None and count > shape.max_items:
        # The validator rejects the length before it looks at any item.
        return [None] * count
    items: list[Any] = []
    spans: list[tuple[int, int, int, bool]] = []
    for index in range(count):
        first = reader.peek()
        if _is_container(first):
            item_start = reader.position
            yield from reader.skip()
            is_map = _is_map(first)
            items.append({} if is_map else [])
            spans.append((index, item_start, reader.position, is_map))
        else:
            items.append((yield from reader.value()))
    del reader
    if shape.items is not None:
        for index, item_start, item_end, is_map in spans:
            items[index] = yield from _read_container(
                view, item_start, item_end, shape.items, is_map
            )
    return items


def _unpack_client_frame(data: bytes | str) -> Steps[dict[str, Any]]:
    """Check a client frame's structure, and return its top-level map with what the model
    of its ``type`` needs read (stand-ins for everything else). Raises BadFrame."""
    if isinstance(data, str):
        raise BadFrame("text frames are not used; send one MessagePack value in a binary frame")
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if not view:
        raise BadFrame("the frame is empty; send one MessagePack map")
    reader = _Reader(view, 0, len(view))
    if not _is_map(reader.peek()):
        value = yield from reader.value()
        if not reader.at_end():
            raise BadFrame("trailing bytes after the MessagePack value")
        raise BadFrame(f"expected a MessagePack map, got {_wire_type(value)}")
    count = yield from reader.map_header()
    values, spans = yield from _read_entries(reader, count, check=True)
    if not reader.at_end():
        raise BadFrame("trailing bytes after the MessagePack value")
    del reader
    kind = values.get("type")
    if not isinstance(kind, str):
        raise BadFrame("the map has no string 'type'")
    model = CLIENT_MESSAGE_TYPES.get(kind)
    if model is not None:
        yield from _read_fields(view, values, spans, _CLIENT_SHAPES[model])
    return values


# --------------------------------------------------------------------------- full decoding


def unpack_frame(data: bytes | str) -> dict[str, Any]:
    """Decode one whole frame to a map with string keys and a string ``type``, or raise
    BadFrame, with the structural bounds of a client message (PROTOCOL.md section 1).

    This builds every value in the frame: fine for small or trusted frames. A server
    decodes client frames with :func:`decode_client_message_in_steps`, which builds only
    what validation needs.
    """
    return _unpack_whole(data, max_entries=MAX_CONTAINER_ENTRIES)


class _Entries(list[tuple[Any, Any]]):
    """A map as msgpack read it: every entry, duplicate keys included."""


def _unpack_whole(data: bytes | str, *, max_entries: int) -> dict[str, Any]:
    if isinstance(data, str):
        raise BadFrame("text frames are not used; send one MessagePack value in a binary frame")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # checked below, to name the problem precisely
            object_pairs_hook=_Entries,  # so that a duplicate key's value is checked too
            ext_hook=_reject_extension,
            use_list=True,
            max_array_len=max_entries,
            max_map_len=max_entries,
        )
    except msgpack.ExtraData:
        raise BadFrame("trailing bytes after the MessagePack value") from None
    except BadFrame:
        raise
    except Exception as exc:  # noqa: BLE001 (msgpack raises several types for bad input)
        raise _bad_frame(exc) from None
    if not isinstance(value, _Entries):
        raise BadFrame(f"expected a MessagePack map, got {_wire_type(value)}")
    checked: dict[str, Any] = _checked(value, depth=0)
    kind = checked.get("type")
    if not isinstance(kind, str):
        raise BadFrame("the map has no string 'type'")
    return checked


def _checked(value: Any, depth: int) -> Any:
    """``value`` with its maps as dicts, once its depth and keys are checked."""
    if depth > MAX_NESTING_DEPTH:
        raise BadFrame(_TOO_DEEP)
    if isinstance(value, _Entries):
        result = {}
        for key, item in value:
            if not isinstance(key, str):
                raise BadFrame(f"map keys must be strings, got {_wire_type(key)}")
            result[key] = _checked(item, depth + 1)
        return result
    if isinstance(value, list):
        return [_checked(item, depth + 1) for item in value]
    if isinstance(value, msgpack.Timestamp):
        # msgpack decodes extension type -1 itself, without calling ext_hook.
        raise BadFrame(f"{_EXTENSION} (extension type -1)")
    return value


def _wire_type(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "bin"
    if isinstance(value, _Entries):
        return "a map"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, _Container):
        return value.kind
    return type(value).__name__


# --------------------------------------------------------------------------- client messages


def decode_client_message_in_steps(
    data: bytes | str, rules: SubmitRules | None = None
) -> Steps[ClientMessage]:
    """Decode and validate one client frame, a bounded slice of work per ``next()``.

    The generator returns the message or raises BadFrame, UnknownType or InvalidRequest.
    A frame of up to :data:`DECODE_STEP_BYTES` is decoded without yielding; a larger one
    yields at least once per :data:`DECODE_STEP_BYTES` read, and what runs between two
    yields is bounded (one step of msgpack, a few thousand map entries at most, or the
    building of one string or bin). A server awaits something that lets other tasks run
    at each yield.
    """
    value = yield from _unpack_client_frame(data)
    return validate_client_message(value, rules)


def run_steps(steps: Steps[T]) -> T:
    """Run a decoding to its end without interruption."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result


def decode_client_message(data: bytes | str, rules: SubmitRules | None = None) -> ClientMessage:
    """Decode and validate one client frame. Raises BadFrame, UnknownType or InvalidRequest."""
    return run_steps(decode_client_message_in_steps(data, rules))


def validate_client_message(
    value: dict[str, Any], rules: SubmitRules | None = None
) -> ClientMessage:
    """Validate an unpacked client map (string ``type``). Raises UnknownType or InvalidRequest.

    A client can run this on what it is about to send, and get the very error (code,
    field, message) the server would answer.
    """
    message_id = value.get("id") if isinstance(value.get("id"), str) else None
    kind = value["type"]
    model = CLIENT_MESSAGE_TYPES.get(kind)
    if model is None:
        known = ", ".join(sorted(CLIENT_MESSAGE_TYPES))
        raise UnknownType(f"unknown message type {quoted(kind)} (known: {known})", id=message_id)
    if rules is not None and kind == "submit" and isinstance(value.get("params"), dict):
        # Every rule but the model's own name is the chosen model's (PROTOCOL.md 3).
        rules = rules.choosing(value["params"].get("model"))
    try:
        return model.model_validate(value, context=rules)
    except ValidationError as exc:
        raise _invalid_request(exc, message_id, kind) from None


def _path_part(part: str | int) -> str:
    text = str(part)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


def _invalid_request(exc: ValidationError, message_id: str | None, kind: str) -> InvalidRequest:
    # Only the first error is reported; leave out what is not needed of every error.
    first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    path = ".".join(_path_part(part) for part in first["loc"])
    error_type = first["type"]
    if error_type == "missing":
        detail = "is required"
    elif error_type == "extra_forbidden":
        detail = "is not a known key"
    else:
        detail = first["msg"]
        detail = detail.removeprefix("Value error, ")
        detail = detail[0].lower() + detail[1:]
    return InvalidRequest(
        f"{path or 'message'} {detail}", field=path, id=message_id, message_type=kind
    )


# --------------------------------------------------------------------------- encoding


def encode_message(message: BaseModel) -> bytes:
    """Encode any protocol message as one MessagePack map (bytes as ``bin``).

    Optional fields left unset (``None``) are omitted, except those a server message
    must carry as nil (``error.id``, ``welcome.model.latent_rgb``).
    """
    if isinstance(message, ClientMessage):
        payload = message.model_dump(exclude_none=True)
    else:
        payload = message.model_dump()
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return packed


def decode_server_message(data: bytes) -> ServerMessage:
    """Decode one server frame for a client. Unknown keys are ignored.

    Raises BadFrame for anything that is not a well-formed server message (a client
    has no one to answer, but gets one exception type to handle).
    """
    # Server messages are not held to the 256-entry bound of client messages (a server
    # may offer more LoRAs than that); their nesting is still checked.
    value = _unpack_whole(data, max_entries=-1)
    try:
        return _SERVER_MESSAGE.validate_python(value)
    except ValidationError as exc:
        raise BadFrame(
            f"not a valid server message: {exc.errors(include_url=False)[0]['msg']}"
        ) from exc
