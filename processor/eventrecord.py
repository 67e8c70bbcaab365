"""The event record: how an `Event` is stored in a stream entry's `e` field, and read back.

Version 1 (the first releases) was `Event` as a msgpack map, every field by name: about as large as the
JSON body it came from. Version 2 is a msgpack array: the version, then `Event`'s fields in their order,
the job (and every struct in it) nested as an array of its fields in order, defaults included (a `None`
costs one byte). The positional layout is not a second definition: it is generated from the model classes
in `processor.models` (`_packed`), which stay the one definition and keep decoding webhook JSON as maps.

Compatibility rules for a change to `Event` or to any struct it holds:
- a new field goes at the END of its class, with a default. An older reader ignores extra trailing
  elements, a newer one fills missing ones with the defaults (msgspec's `array_like` behaviour; tested),
  so old and new processes read each other's records and the version stays 2;
- anything else (a field removed, reordered or retyped, a field added to a struct another one subclasses,
  such as `Hyperparameters`) moves positions: it needs version 3, and a reader of versions 1 and 2 refuses
  a version 3 record with a `DecodeError` that says so (the worker dead-letters it as undecodable, and
  `ftjobs dlq replay` brings it back once every process reads it). `tests/test_models.py` pins the
  layout (`record_layout`), so such a change cannot go unnoticed.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Struct

from processor.models import Event, decoding


def encode_event(event: Event) -> bytes:
    """The record stored in the stream (`e` field): version 2, positional (see the module's docstring)."""
    return _encoder.encode(msgspec.convert(event, _PACKED_EVENT, from_attributes=True))


def decode_event(raw: bytes) -> Event:
    """Read a stored record back, version 2 or 1 (told apart by its first byte: an array or a map); raises
    `msgspec.DecodeError` (or its subclass `ValidationError`) when it is not one this release reads."""
    if not raw:
        raise msgspec.DecodeError("an empty event record")
    head = raw[0]
    if head in _MAP_HEADS:  # version 1: Event's fields by name
        return decoding(_v1_decoder.decode, raw)
    header = _ARRAY_HEADERS.get(head)
    if header is None:
        raise msgspec.DecodeError(f"not an event record (it starts with byte 0x{head:02x}, not a msgpack array or map)")
    version = raw[header] if len(raw) > header else None
    if version != EVENT_RECORD_VERSION:
        raise msgspec.DecodeError(_version_error(version))
    packed = decoding(_packed_decoder.decode, raw)
    # The positional copy holds the values untyped; converting it checks every one against `Event`'s types.
    return decoding(_to_event, packed)


def _to_event(packed: Any) -> Event:
    event: Event = msgspec.convert(packed, Event, from_attributes=True)
    return event


#: The version `encode_event` writes (the first element of the array).
EVENT_RECORD_VERSION: Final = 2
#: The first byte of a msgpack map (version 1 records): fixmap, map 16, map 32.
_MAP_HEADS: Final = frozenset((*range(0x80, 0x90), 0xDE, 0xDF))
#: The first byte of a msgpack array (version 2 and later) → the length of the array's header: fixarray,
#: array 16, array 32. The version follows the header (a positive fixint: one byte).
_ARRAY_HEADERS: Final = {**dict.fromkeys(range(0x90, 0xA0), 1), 0xDC: 3, 0xDD: 5}


def _version_error(version: int | None) -> str:
    if version is None or version >= 0x80:
        return "not an event record (an array whose first element is no record version)"
    if version > EVENT_RECORD_VERSION:
        return (
            f"event record version {version} is newer than this release reads (1 to {EVENT_RECORD_VERSION}): "
            "it was written by a later ftjobs after an incompatible change; upgrade this process to read it"
        )
    return f"not an event record (version {version} does not exist)"


def _mentions_struct(tp: Any) -> bool:
    if isinstance(tp, type):
        return issubclass(tp, Struct)
    return get_origin(tp) is not Literal and any(_mentions_struct(arg) for arg in get_args(tp))


def _packed_type(tp: Any) -> Any:
    """`tp` with every Struct replaced by its positional twin (and constraints dropped: they are checked
    when the record is converted back to the model classes)."""
    if isinstance(tp, type) and issubclass(tp, Struct):
        return _packed(tp)
    origin = get_origin(tp)
    if origin is None or origin is Literal:
        return tp
    if origin is Annotated:
        return _packed_type(get_args(tp)[0])
    args = tuple(_packed_type(arg) for arg in get_args(tp))
    if origin is Union or origin is types.UnionType:
        return Union[args]  # noqa: UP007 (built from a tuple)
    return origin[args if len(args) > 1 else args[0]]


_PACKED: Final[dict[type[Struct], type[Struct]]] = {}


def _packed(cls: type[Struct], **config: Any) -> type[Struct]:
    """The positional (`array_like`) twin of a model class: its fields in the same order, with defaults. A
    field that holds structs gets the twins' types; every other field is `Any`, so converting an event to
    its twin (to encode it) only copies values, and the twin decodes any value: reading one back converts
    the twin to the model class, which checks every value against the model's types."""
    if cls in _PACKED:
        return _PACKED[cls]
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for info in msgspec.structs.fields(cls):
        tp = _packed_type(info.type) if _mentions_struct(info.type) else Any
        if info.default is not msgspec.NODEFAULT:
            fields.append((info.name, tp, info.default))
        elif info.default_factory is not msgspec.NODEFAULT:
            fields.append((info.name, tp, msgspec.field(default_factory=info.default_factory)))
        else:
            fields.append((info.name, tp))
    twin = msgspec.defstruct(f"Packed{cls.__name__}", fields, array_like=True, kw_only=True, module=__name__, **config)
    assert [f.name for f in msgspec.structs.fields(twin)] == [f.name for f in msgspec.structs.fields(cls)]
    _PACKED[cls] = twin
    return twin


#: `Event`'s twin, its version as the array's first element (a msgspec tag; the tag field's name is unused).
_PACKED_EVENT: Final = _packed(Event, tag=EVENT_RECORD_VERSION, tag_field="record_version")
_encoder: Final = msgspec.msgpack.Encoder()
_packed_decoder: Final = msgspec.msgpack.Decoder(_PACKED_EVENT)
_v1_decoder: Final = msgspec.msgpack.Decoder(Event)


def record_layout() -> dict[str, list[str]]:
    """The version 2 record's positions: each struct's field names, in order (pinned by the tests)."""
    return {cls.__name__: [f.name for f in msgspec.structs.fields(twin)] for cls, twin in _PACKED.items()}
