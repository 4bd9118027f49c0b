"""Bytes <-> messages, with every malformed input turned into a :class:`ProtocolError`.

The decoder runs the checks of PROTOCOL.md section 3 in order: ``bad_frame`` (not one
MessagePack map with string keys and a string ``type``), ``unknown_type``, then
``invalid_request`` naming the first offending field as a dotted path.
"""

from __future__ import annotations

from typing import Any

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import BadFrame, InvalidRequest, UnknownType
from .messages import CLIENT_MESSAGE_TYPES, ClientMessage, ServerMessage, SubmitRules

_SERVER_MESSAGE = TypeAdapter[ServerMessage](ServerMessage)

# Without a bound, a frame of nested one-byte arrays could build millions of objects.
_MAX_NESTING = 32


class _ExtensionType(Exception):
    pass


def _reject_extension(code: int, data: bytes) -> Any:
    raise _ExtensionType(f"extension type {code}")


def unpack_frame(data: bytes | str) -> dict[str, Any]:
    """Decode one frame to a map with string keys and a string ``type``, or raise BadFrame."""
    if isinstance(data, str):
        raise BadFrame("text frames are not used; send one MessagePack value in a binary frame")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,  # checked below, to name the problem precisely
            ext_hook=_reject_extension,
            use_list=True,
        )
    except msgpack.ExtraData:
        raise BadFrame("trailing bytes after the MessagePack value") from None
    except _ExtensionType as exc:
        raise BadFrame(f"MessagePack extension types are not used ({exc})") from None
    except Exception as exc:  # noqa: BLE001 (msgpack raises several types for bad input)
        raise BadFrame(f"not one well-formed MessagePack value ({exc})") from None
    if not isinstance(value, dict):
        raise BadFrame(f"expected a MessagePack map, got {_wire_type(value)}")
    _check_keys(value, depth=0)
    kind = value.get("type")
    if not isinstance(kind, str):
        raise BadFrame("the map has no string 'type'")
    return value


def _check_keys(value: Any, depth: int) -> None:
    if depth > _MAX_NESTING:
        raise BadFrame(f"values nested deeper than {_MAX_NESTING} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BadFrame(f"map keys must be strings, got {_wire_type(key)}")
            _check_keys(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_keys(item, depth + 1)
    elif isinstance(value, msgpack.Timestamp):
        # msgpack decodes extension type -1 itself, without calling ext_hook.
        raise BadFrame("MessagePack extension types are not used (extension type -1)")


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
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def decode_client_message(data: bytes | str, rules: SubmitRules | None = None) -> ClientMessage:
    """Decode and validate one client frame. Raises BadFrame, UnknownType or InvalidRequest."""
    return validate_client_message(unpack_frame(data), rules)


def validate_client_message(
    value: dict[str, Any], rules: SubmitRules | None = None
) -> ClientMessage:
    """Validate an unpacked client map (string ``type``). Raises UnknownType or InvalidRequest.

    A client can run this on what it is about to send, and get the very error (code,
    field, message) the server would answer.
    """
    message_id = value.get("id") if isinstance(value.get("id"), str) else None
    model = CLIENT_MESSAGE_TYPES.get(value["type"])
    if model is None:
        known = ", ".join(sorted(CLIENT_MESSAGE_TYPES))
        raise UnknownType(f"unknown message type {value['type']!r} (known: {known})", id=message_id)
    try:
        return model.model_validate(value, context=rules)
    except ValidationError as exc:
        raise _invalid_request(exc, message_id) from None


def _invalid_request(exc: ValidationError, message_id: str | None) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    path = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "missing":
        detail = "is required"
    elif kind == "extra_forbidden":
        detail = "is not a known key"
    else:
        detail = first["msg"]
        detail = detail.removeprefix("Value error, ")
        detail = detail[0].lower() + detail[1:]
    return InvalidRequest(f"{path or 'message'} {detail}", field=path, id=message_id)


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
    value = unpack_frame(data)
    try:
        return _SERVER_MESSAGE.validate_python(value)
    except ValidationError as exc:
        raise BadFrame(
            f"not a valid server message: {exc.errors(include_url=False)[0]['msg']}"
        ) from exc
