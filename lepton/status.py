"""Status messages as plain JSON-able data, and the file a parameter server leaves its last status in."""

from __future__ import annotations

import math

from google.protobuf import json_format
from google.protobuf.message import Message

from lepton.v1 import coordinator_pb2 as cpb


def state_name(state: int) -> str:
    return cpb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


# A parameter server started with --state-dir writes this file there when it stops cleanly: its
# GetServerStatusResponse as JSON (``to_plain``). It removes the file when it starts, so the file
# is never a previous incarnation's. `lepton up` reports it (a poll can miss the last steps).
FINAL_STATUS_FILE = "final_status.json"


def to_plain(msg: Message) -> dict:
    """A message as JSON-able data: proto field names, enum value names, int64 as numbers,
    every field present (defaults included) except the unset members of a oneof, NaN and
    infinities as None (JSON has neither; a coordinator from before their validation may still
    report them)."""
    out: dict = {}
    for field in msg.DESCRIPTOR.fields:
        if field.containing_oneof is not None and not msg.HasField(field.name):
            continue  # the other members of a oneof (e.g. regression metrics of a classification job)
        value = getattr(msg, field.name)
        repeated = field.is_repeated
        if field.message_type is not None:
            if field.message_type.full_name == "google.protobuf.Struct":
                out[field.name] = json_format.MessageToDict(value)
            else:
                out[field.name] = [to_plain(v) for v in value] if repeated else to_plain(value)
        elif field.enum_type is not None:
            name = field.enum_type.values_by_number
            out[field.name] = (
                [name[v].name for v in value] if repeated else name[value].name if value in name else value
            )
        elif isinstance(value, float) and not math.isfinite(value):
            out[field.name] = None
        elif repeated and field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
            out[field.name] = [v if math.isfinite(v) else None for v in value]
        elif repeated:
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def status_dict(status: cpb.GetStatusResponse) -> dict:
    """The status as plain JSON-able data; ``state`` is the short lower-case name."""
    data = to_plain(status)
    data["state"] = state_name(status.state)
    return data
