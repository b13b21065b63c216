"""Generate the Python protobuf and gRPC code from protos/ into services/common/pb/.

`python tools/gen_proto.py` writes the code; `--check` only compares and exits 1 when the
checked-in code is stale. protoc writes absolute imports (`from disagg.v1 import x_pb2`); they are
rewritten to the package the code lives in.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_DIR = ROOT / "services" / "common" / "pb"
OUT_PACKAGE = "services.common.pb"
IMPORT_RE = re.compile(r"^from disagg\.v1 import ", re.MULTILINE)


def generate() -> dict[str, str]:
    """Run protoc into a temporary folder and return {file name: rewritten text}."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{Path(protoc.__file__).parent / '_proto'}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / "disagg" / "v1"
        return {p.name: IMPORT_RE.sub(f"from {OUT_PACKAGE} import ", p.read_text())
                for p in sorted(generated.iterdir()) if p.suffix in (".py", ".pyi")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated code is stale")
    args = parser.parse_args()
    files = generate()
    files["__init__.py"] = '"""Generated from protos/ by `make proto`. Do not edit."""\n'
    current = {p.name: p.read_text() for p in OUT_DIR.glob("*.py*")} if OUT_DIR.exists() else {}
    if args.check:
        stale = sorted(set(files) ^ set(current) | {n for n in files if current.get(n) != files[n]})
        if stale:
            print("stale generated protobuf code, run `make proto`: " + ", ".join(stale))
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in set(current) - set(files):
        (OUT_DIR / name).unlink()
    for name, text in files.items():
        (OUT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
