"""Regenerates the committed Python stubs in lepton/v1 from protos/: ``python -m lepton.protogen``.

The stubs are committed so that ``pip install .`` needs no code generation; a contract test fails
when they are stale. Needs grpcio-tools (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[1]
    protos = sorted(str(p.relative_to(root / "protos")) for p in (root / "protos").rglob("*.proto"))
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{root / 'protos'}", f"-I{include}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", *protos]
    code = protoc.main(args)
    if code == 0:
        print(f"regenerated {len(protos)} protos into {root / 'lepton' / 'v1'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
