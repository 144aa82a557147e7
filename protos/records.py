"""Messages as JSON-ready records: the one flattening of a proto message into Python values.

The engine writes its telemetry files with it (every field, so readers find every step field) and
:func:`megascope.protos.events.detail_fields` shows an event's detail with it (set fields only).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message


def message_record(message: Message, set_only: bool = False) -> dict[str, Any]:
    """A message as a JSON-ready dict: every field by its proto name, numbers as numbers, enums by name.

    ``set_only`` leaves out every field at its default (as ``ListFields`` does), for display: an event's detail
    shows what it says, not a row of zeros.

    The proto JSON mapping (``json_format.ParseDict`` reads it back), except that int64 stays a number
    (MessageToDict would write a string) and fields at their default are written too, as readers of the
    telemetry files expect every step field (``restart_count`` is 0 in a first attempt). An optional scalar
    that is absent is written as null, as the files always had it; of a oneof, only the member that is set.
    """
    record: dict[str, Any] = {}
    fields = _fields_of(message.DESCRIPTOR)
    if set_only:
        kinds = dict(fields)
        fields = [(field, kinds[field]) for field, _ in message.ListFields()]
    for field, kind in fields:
        name = field.name
        if kind in (_ONEOF, _OPTIONAL) and not message.HasField(name):
            if kind == _OPTIONAL:
                record[name] = None
            continue
        value = getattr(message, name)
        if kind == _MAP:
            record[name] = {k: message_record(v, set_only) if isinstance(v, Message) else v for k, v in value.items()}
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            record[name] = (
                [message_record(v, set_only) for v in value] if kind == _REPEATED else message_record(value, set_only)
            )
        elif field.type == FieldDescriptor.TYPE_ENUM:
            names = field.enum_type.values_by_number
            record[name] = [names[v].name for v in value] if kind == _REPEATED else names[value].name
        else:
            record[name] = list(value) if kind == _REPEATED else value
    return record


_PLAIN, _OPTIONAL, _ONEOF, _REPEATED, _MAP = range(5)
_FIELDS: dict[str, list[tuple[FieldDescriptor, int]]] = {}


def _fields_of(descriptor: Descriptor) -> list[tuple[FieldDescriptor, int]]:
    # Cached per message type: the step report is written every step, and this keeps it a plain loop.
    fields = _FIELDS.get(descriptor.full_name)
    if fields is None:
        fields = [(field, _field_kind(field)) for field in descriptor.fields]
        _FIELDS[descriptor.full_name] = fields
    return fields


def _field_kind(field: FieldDescriptor) -> int:
    if field.is_repeated:
        return _MAP if field.message_type is not None and field.message_type.GetOptions().map_entry else _REPEATED
    if field.containing_oneof is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
        return _ONEOF
    if field.has_presence and field.type != FieldDescriptor.TYPE_MESSAGE:
        return _OPTIONAL
    return _PLAIN
