"""Regenerate the gRPC stubs from ``proto/autoglm/v1/inference.proto`` (grpcio-tools).

``python -m auto_glm.rpc.codegen`` writes ``auto_glm/rpc/v1/inference_pb2{,_grpc}.py`` and
the type stub ``inference_pb2.pyi``; ``--check`` regenerates into a scratch directory and
exits 1, naming the stale files, when the committed ones differ (CI runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

__all__ = ["generate", "main"]

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTO = Path("autoglm/v1/inference.proto")
TARGET = Path(__file__).resolve().parent / "v1"
FILES = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
_IMPORT = "from autoglm.v1 import inference_pb2"
_PACKAGE_IMPORT = "from auto_glm.rpc.v1 import inference_pb2"


def generate(out: Path) -> None:
    """Write the three generated files into ``out``."""
    from grpc_tools import protoc  # a development dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as scratch:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            text = (Path(scratch) / PROTO.parent / name).read_text()
            # protoc imports by the proto's path; the stubs live inside our package
            (out / name).write_text(text.replace(_IMPORT, _PACKAGE_IMPORT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auto_glm.rpc.codegen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(TARGET)
        print(f"wrote {', '.join(FILES)} in {TARGET}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        stale = [
            n
            for n in FILES
            if not (TARGET / n).is_file() or not filecmp.cmp(Path(scratch) / n, TARGET / n, False)
        ]
    if stale:
        print(
            f"stale gRPC stubs in {TARGET}: {', '.join(stale)}; regenerate them with "
            "python -m auto_glm.rpc.codegen and commit the result",
            file=sys.stderr,
        )
        return 1
    print("gRPC stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
