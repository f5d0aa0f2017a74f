"""How much memory one sample at the axis maxima takes while the model runs, measured in a child process.

The server sizes its batches with this figure (``serving.max_sample_bytes`` in the manifest): a batch's
cost is each request's rows times its share of the largest sample's elements times this figure. For a
model whose memory grows faster than its input (attention is quadratic in the sequence), scaling down
linearly from the largest sample over-estimates, which is the safe side.

The child opens the FP32 model with ONNX Runtime's CPU arena off (so a run's buffers are returned when
it ends), runs once to settle what stays (pre-packed weights), then resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and reads ``VmHWM`` after one run of 1 sample and one of 4 samples, all at
the maxima of every named axis. The figure is the larger of the 1-sample peak and a quarter of the
4-sample peak. It also proves that the model runs at those maxima: a bound above what the model can
take (a sequence longer than its position embeddings) fails here, at build time, naming the axis.

Run as ``python -m model_build.memory MODEL INPUTS.npz`` it prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BuildError
from .spec import Spec

REPO_ROOT = Path(__file__).resolve().parents[1]
PROBE_ROWS = 4
TIMEOUT_S = 300


def max_sample_inputs(spec: Spec, rows: int) -> dict[str, np.ndarray]:
    """Inputs of ``rows`` samples with every named axis at its maximum (floats 0, integers 1)."""
    arrays = {}
    for tensor in spec.inputs:
        shape = tuple(
            rows if d == "batch" else spec.axes[d] if isinstance(d, str) else d for d in tensor.shape
        )
        dtype = np.float32 if tensor.dtype == "float32" else np.int64
        arrays[tensor.name] = np.zeros(shape, dtype) if dtype is np.float32 else np.ones(shape, dtype)
    return arrays


def measure_sample_bytes(model: Path, spec: Spec) -> dict[str, Any]:
    """Measure the run-time memory of one sample at the axis maxima (see the module docstring).

    Returns:
        ``{"max_sample_bytes": int, "peak_1": int, "peak_4": int, "axes": {...}}``.

    Raises:
        BuildError: the model fails at the maxima (naming ``axes``) or the child fails.
    """
    with tempfile.TemporaryDirectory(prefix="dualdeploy-memory-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **max_sample_inputs(spec, PROBE_ROWS))  # type: ignore[arg-type]
        try:
            done = subprocess.run(
                [sys.executable, "-m", "model_build.memory", str(model), str(inputs)],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BuildError("parity", f"the memory probe took over {TIMEOUT_S} s") from exc
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][-600:]
        shown = ", ".join(f"axes.{k}={v}" for k, v in sorted(spec.axes.items())) or "the fixed input shape"
        raise BuildError("parity", f"the FP32 model does not run at {shown}: {tail}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["axes"] = dict(spec.axes)
    return figures


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_of(run: Any, inputs: Mapping[str, np.ndarray]) -> int:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)
    base = _status_kib("VmRSS")
    run(inputs)
    return max(0, _status_kib("VmHWM") - base) * 1024


def _child(model: str, inputs_path: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    with np.load(inputs_path) as data:
        inputs = {name: data[name] for name in data.files}
    one = {k: v[:1] for k, v in inputs.items()}

    def run(feed: Mapping[str, np.ndarray]) -> None:
        session.run(None, dict(feed))

    run(one)
    peak_1 = _peak_of(run, one)
    peak_n = _peak_of(run, inputs)
    rows = len(next(iter(inputs.values())))
    print(
        json.dumps({"max_sample_bytes": max(peak_1, -(-peak_n // rows)), "peak_1": peak_1, "peak_4": peak_n})
    )


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
