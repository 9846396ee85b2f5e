"""``lepton status``: the job as the coordinator sees it, for people or as JSON."""

from __future__ import annotations

import json
import math
import sys

from google.protobuf import json_format
from google.protobuf.message import Message

from lepton.errors import LeptonError
from lepton.process import EXIT_LOST_CONTACT, exit_code_for
from lepton.security import INSECURE, Security
from lepton.retry import RetryPolicy
from lepton.v1 import common_pb2 as common
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


def render(status: cpb.GetStatusResponse) -> str:
    job = status.job
    lines = [
        f"job        {state_name(status.state)}"
        + (f" ({status.failure})" if status.failure else ""),
        f"workload   {job.dataset} / {job.model}, mode {common.ConsistencyMode.Name(job.mode).removeprefix('CONSISTENCY_MODE_').lower()}, "
        f"optimizer {job.optimizer.name} lr {job.optimizer.learning_rate:g}",
        f"epoch      {status.epoch + 1}/{job.epochs}: {status.shards_completed_in_epoch}/{job.shards_per_epoch} shards done, "
        f"{status.shards_leased} leased, {status.shards_pending} pending",
        f"counts     {status.shard_completions} completions, {status.duplicate_completions_rejected} duplicates rejected, "
        f"{status.reassignments} reassignments, {status.members_declared_dead} members declared dead",
        f"training   {status.samples_trained} samples, {status.samples_per_second:.0f} samples/s, loss "
        + ("-" if math.isnan(status.recent_loss) else f"{status.recent_loss:.4f}"),
    ]
    if status.has_evaluation:
        lines += evaluation_lines(status.evaluation)
    lines.append("members")
    for m in status.members:
        role = "ps" if m.role == common.ROLE_PARAMETER_SERVER else "worker"
        lease = f"  epoch {m.lease.epoch} shard {m.lease.shard} @ {m.lease.offset}" if m.has_lease else ""
        lines.append(
            f"  {m.member.member_id:<12} {role:<7} inc {m.member.incarnation:<3} "
            f"{'alive' if m.alive else 'dead ':<6} heartbeat {m.last_heartbeat_age_s:5.1f}s ago"
            f"  pid {m.pid}@{m.hostname}{(' (' + m.instance + ')') if m.instance else ''}"
            f"{('  ' + m.address) if m.address else ''}{lease}"
        )
    return "\n".join(lines)


def evaluation_lines(msg: cpb.EvaluationResult) -> list[str]:
    """The test metrics of ``render``: regression MSE, MAE and R²; classification accuracy and
    recall, then per-class recall and the confusion matrix (rows: true class)."""
    if msg.WhichOneof("task_metrics") == "regression":
        r = msg.regression
        return [f"test       mse {r.mse:.4f}, mae {r.mae:.4f}, r2 {r.r2:.4f}, loss {msg.loss:.4f}"]
    lines = [f"test       accuracy {msg.accuracy:.4f}, macro recall {msg.macro_recall:.4f}, loss {msg.loss:.4f}"]
    c = msg.classification
    if c.per_class_recall:
        lines.append("  recall   " + " ".join("-" if math.isnan(r) else f"{r:.2f}" for r in c.per_class_recall))
    k = c.num_classes
    width = max((len(str(v)) for v in c.confusion_matrix), default=1)
    for i in range(k):
        row = " ".join(f"{v:>{width}}" for v in c.confusion_matrix[i * k : (i + 1) * k])
        lines.append(("  confusion " if i == 0 else " " * 12) + row)
    return lines


def cancel_job(address: str, reason: str, security: Security = INSECURE) -> int:
    from lepton.coordinator_client import CoordinatorClient  # here: `lepton up` imports this module before torch

    client = CoordinatorClient(address, timeout_s=5.0, security=security)
    try:
        client.cancel(reason)
    except LeptonError as exc:
        print(f"lepton cancel: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    finally:
        client.close()
    print(f"job at {address} cancelled: {reason}")
    return 0


def show_status(address: str, as_json: bool = False, security: Security = INSECURE) -> int:
    from lepton.coordinator_client import CoordinatorClient

    client = CoordinatorClient(
        address, timeout_s=5.0, retry=RetryPolicy(max_attempts=3, max_total_s=10.0), security=security
    )
    try:
        status = client.status()
    except LeptonError as exc:
        print(f"lepton status: cannot reach the coordinator at {address}: {exc}", file=sys.stderr)
        return EXIT_LOST_CONTACT
    finally:
        client.close()
    print(json.dumps(status_dict(status), indent=2, allow_nan=False) if as_json else render(status))
    return 0
