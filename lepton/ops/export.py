"""``lepton export``: turn a complete checkpoint into one plain PyTorch ``state_dict`` file, no
cluster needed (``lepton checkpoint`` asks a running job for one: lepton.ops.checkpoint_request).

Where export looks: ``--checkpoint`` names a manifest JSON file, a coordinator's ``--state-dir``
(manifests in ``checkpoints/``), or a ``lepton up --state-dir`` (manifests in
``coordinator/checkpoints/``). Without ``--id`` it takes the complete checkpoint with the highest
id, which after a successful job is the final one. Each server's file is read from the absolute
path in the manifest, or, when the state directory was moved, from the same place relative to it
(``<up state dir>/<server id>/checkpoints/snapshots/<id>.pt``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lepton.errors import ConfigError, InvalidArgument
from lepton.files import write_atomically
from lepton.tensors import TensorSpec, assemble

MANIFEST_FORMAT = "lepton-checkpoint-manifest/1"


@dataclass(frozen=True)
class ExportResult:
    checkpoint_id: str
    out: Path
    tensors: tuple[str, ...]
    versions: dict[str, int]  # server -> version of its snapshot
    manifest: Path


def _manifests(directory: Path) -> list[Path]:
    for candidate in (directory / "checkpoints", directory / "coordinator" / "checkpoints"):
        found = sorted(candidate.glob("ckpt-*.json")) if candidate.is_dir() else []
        if found:
            return found
    return []


def find_manifest(checkpoint: str | Path, checkpoint_id: str = "") -> Path:
    """The manifest file ``checkpoint`` names or holds (the newest complete one unless
    ``checkpoint_id``). Raises ConfigError when there is none."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"{path} is neither a checkpoint manifest nor a directory")
    found = _manifests(path)
    if checkpoint_id:
        found = [m for m in found if m.stem == checkpoint_id]
    if not found:
        wanted = f"checkpoint {checkpoint_id}" if checkpoint_id else "a complete checkpoint"
        raise ConfigError(
            f"no manifest of {wanted} under {path} (looked in checkpoints/ and coordinator/checkpoints/); "
            "checkpoints are published by a coordinator with --state-dir once every server wrote its file"
        )
    return max(found, key=lambda m: int(m.stem.removeprefix("ckpt-")))


def _server_file(manifest_path: Path, checkpoint_id: str, server: str, recorded: str) -> Path:
    recorded_path = Path(recorded)
    if recorded_path.is_file():
        return recorded_path
    # A moved `lepton up` state directory: <root>/coordinator/checkpoints/<id>.json beside <root>/<server>/.
    root = manifest_path.resolve().parent.parent.parent
    moved = root / server / "checkpoints" / "snapshots" / recorded_path.name
    if moved.is_file():
        return moved
    raise ConfigError(f"checkpoint {checkpoint_id}: the file of {server} is missing ({recorded}, nor {moved})")


def merge(manifest_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and the model's tensors merged from every server's file (whole tensors as they
    are, row slices concatenated back into their parameters). Raises ConfigError for an incomplete
    or inconsistent checkpoint."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{manifest_path} is not a readable manifest: {exc}") from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{manifest_path} is not a Lepton checkpoint manifest ({MANIFEST_FORMAT})")
    checkpoint_id = manifest["checkpoint_id"]
    missing = sorted(set(manifest["servers"]) - set(manifest["reports"]))
    if manifest.get("error") or missing:
        raise ConfigError(f"checkpoint {checkpoint_id} is not complete: {manifest.get('error') or missing}")
    tensors: dict[str, torch.Tensor] = {}
    for server in manifest["servers"]:
        report = manifest["reports"][server]
        path = _server_file(manifest_path, checkpoint_id, server, report["path"])
        state = torch.load(path, weights_only=True, map_location="cpu")
        if int(state["version"]) != int(report["version"]):
            raise ConfigError(f"{path} holds version {state['version']}, the manifest says {report['version']}")
        expected = set(manifest["tensors"].get(server, ()))
        if set(state["params"]) != expected:
            raise ConfigError(
                f"{path} holds tensors {sorted(state['params'])[:8]}, the manifest {sorted(expected)[:8]}"
            )
        for name, value in state["params"].items():
            if name in tensors:
                raise ConfigError(f"tensor {name!r} is in more than one server's file")
            tensors[name] = value.detach().clone().contiguous()
    return manifest, _join_slices(manifest, tensors)


def _join_slices(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole parameters from the servers' tensors: slices (manifest "slices") are concatenated in
    row order; everything else is already whole."""
    slices = manifest.get("slices", {})
    specs = [
        TensorSpec(
            name, value.dtype, tuple(value.shape),
            parameter=slices[name]["parameter"] if name in slices else "",
            row_offset=slices[name]["row_offset"] if name in slices else 0,
            parameter_shape=tuple(slices[name]["parameter_shape"]) if name in slices else (),
        )
        for name, value in tensors.items()
    ]
    try:
        whole = assemble(specs, tensors)
    except InvalidArgument as exc:
        raise ConfigError(f"checkpoint {manifest['checkpoint_id']}: {exc}") from exc
    for alias, name in manifest.get("tied", {}).items():  # tied weights: one tensor, every name
        if name in whole:
            whole[alias] = whole[name]
    return whole


def export_checkpoint(checkpoint: str | Path, out: str | Path, checkpoint_id: str = "") -> ExportResult:
    """Writes the checkpoint's model state as a plain ``state_dict`` (parameters, frozen ones
    included, and persistent buffers, under the model's ``state_dict`` names; tensors only, so
    ``torch.load(out, weights_only=True)`` reads it and ``load_state_dict(strict=True)`` takes it),
    atomically. Raises ConfigError."""
    manifest_path = find_manifest(checkpoint, checkpoint_id)
    manifest, tensors = merge(manifest_path)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out_path, lambda f: torch.save(tensors, f))
    versions = {s: int(r["version"]) for s, r in manifest["reports"].items()}
    return ExportResult(manifest["checkpoint_id"], out_path, tuple(tensors), versions, manifest_path)
