"""Run an ONNX model on the CPU from inside an emulator: ``python -m model_build.emulate``.

The prebuild's INT8 gate starts this module under a CPU class's emulator (``qemu-x86_64 -cpu Haswell``
for the AVX2 class), so ONNX Runtime dispatches that class's integer kernels. qemu-user runs child
processes natively, so everything happens in this one process, and it imports nothing but NumPy and
ONNX Runtime (each import is slow under emulation).

    python -m model_build.emulate MODEL.onnx --run IN.npz OUT.npz [--run IN2.npz OUT2.npz ...]

Each ``IN.npz`` holds the model's inputs by name (other arrays, e.g. ``labels``, are ignored); each
``OUT.npz`` receives the outputs by name. Exit 0 on success, 1 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_CHUNK = 32


def run(model: Path, pairs: list[tuple[Path, Path]]) -> None:
    """Run ``model`` on each input file and write each output file (in chunks of 32 rows)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    for source, target in pairs:
        with np.load(source, allow_pickle=False) as data:
            arrays = {n: data[n] for n in names}
        count = len(arrays[names[0]])
        parts = [
            session.run(outputs, {n: a[start : start + _CHUNK] for n, a in arrays.items()})
            for start in range(0, count, _CHUNK)
        ]
        result = {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(outputs)}
        with target.open("wb") as handle:
            np.savez(handle, **result)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run; errors go to stderr with exit status 1."""
    parser = argparse.ArgumentParser(
        prog="python -m model_build.emulate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", type=Path, help="the ONNX model")
    parser.add_argument(
        "--run",
        nargs=2,
        type=Path,
        action="append",
        required=True,
        metavar=("IN", "OUT"),
        help="an .npz of inputs and the .npz to write the outputs to (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        run(args.model, [(a, b) for a, b in args.run])
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
