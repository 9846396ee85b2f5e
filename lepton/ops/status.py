"""``lepton status`` and ``lepton cancel``: the job as the coordinator sees it, for people or as JSON."""

from __future__ import annotations

import json
import math
import sys

from lepton.errors import LeptonError
from lepton.process import EXIT_LOST_CONTACT, exit_code_for
from lepton.retry import RetryPolicy
from lepton.security import INSECURE, Security
from lepton.status import state_name, status_dict
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb


def render(status: cpb.GetStatusResponse) -> str:
    job = status.job
    mode = common.ConsistencyMode.Name(job.mode).removeprefix("CONSISTENCY_MODE_").lower()
    lines = [
        f"job        {state_name(status.state)}" + (f" ({status.failure})" if status.failure else ""),
        f"workload   {job.dataset} / {job.model}, mode {mode}, "
        f"optimizer {job.optimizer.name} lr {job.optimizer.learning_rate:g}",
        f"epoch      {status.epoch + 1}/{job.epochs}: "
        f"{status.shards_completed_in_epoch}/{job.shards_per_epoch} shards done, "
        f"{status.shards_leased} leased, {status.shards_pending} pending",
        f"counts     {status.shard_completions} completions, "
        f"{status.duplicate_completions_rejected} duplicates rejected, "
        f"{status.reassignments} reassignments, {status.members_declared_dead} members declared dead",
        f"training   {status.samples_trained} samples, {status.samples_per_second:.0f} samples/s, loss "
        + ("-" if math.isnan(status.recent_loss) else f"{status.recent_loss:.4f}"),
    ]
    if status.validation:
        lines.append("validation")
        lines += ["  " + validation_line(row) for row in status.validation]
    if status.stopped_early:
        lines.append(f"stopped    {status.stopped_early}")
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


def validation_line(row: cpb.ValidationRecord) -> str:
    """One validation: its epoch (1-based, as the epoch line), step, and the task's metrics."""
    ev = row.evaluation
    if ev.WhichOneof("task_metrics") == "regression":
        metrics = f"mse {ev.regression.mse:.4f}, mae {ev.regression.mae:.4f}, r2 {ev.regression.r2:.4f}"
    else:
        metrics = f"accuracy {ev.accuracy:.4f}, macro recall {ev.macro_recall:.4f}"
    return (
        f"epoch {row.epoch + 1:<3} step {row.step:<6} {metrics}, loss {ev.loss:.4f}  "
        f"at {row.training_seconds:.1f}s" + ("  (final)" if row.final else "")
    )


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
    from lepton.coordinator_client import CoordinatorClient

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
