#!/usr/bin/env python3
"""The edge health gate: wait for readiness, then one golden-input inference within tolerance.

The server itself runs the bundle's on-device quality gate (the whole quality set, on this device's real
kernels) before it reports ready; this check reads that gate's figures from /metrics and reports them.

Runs on the device with the server's venv (``PYTHONPATH`` = the shipped server code), so it uses the
same bundle contract as the prebuild: ``contract.bundle.compare_outputs`` against the manifest's golden
outputs, with the tolerance of the variant the server reports it runs. Standard library HTTP only.

Exit 0 and one JSON line ``{"version", "variant", "latency_ms", "figures"}`` when healthy; otherwise exit 1
with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from contract.bundle import BundleError, compare_outputs, load_tensors, read_manifest
from contract.codec import HEADER_LENGTH, decode_infer_response, encode_infer_request


class HealthGateError(Exception):
    """The server is not ready or answers outside the golden tolerance."""


def _request(
    url: str,
    *,
    token: str | None,
    context: ssl.SSLContext | None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes, str | None]:
    """GET (or POST ``data``); return the status, the body and its ``Inference-Header-Content-Length``."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.read(), resp.headers.get(HEADER_LENGTH)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise HealthGateError(f"{url} answered HTTP {exc.code}: {detail}") from exc


def wait_ready(
    base: str,
    timeout: float,
    token: str | None,
    context: ssl.SSLContext | None,
    alive: Callable[[], str | None] | None = None,
) -> float:
    """Poll /v2/health/ready until it answers 200; return the seconds waited.

    ``alive`` (when given) is asked before each poll and returns why the server is gone, or None: a
    server that exits or crash-loops fails the gate at once instead of after ``timeout``.
    """
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout:
        gone = alive() if alive is not None else None
        if gone:
            raise HealthGateError(f"{gone} after {time.monotonic() - start:.1f} s, before it was ready")
        try:
            status, _, _ = _request(f"{base}/v2/health/ready", token=token, context=context, timeout=5.0)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except HealthGateError as exc:
            last = str(exc)
        except (OSError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise HealthGateError(f"{base}/v2/health/ready not ready after {timeout:.0f}s (last: {last})")


def served_info(base: str, token: str | None, context: ssl.SSLContext | None) -> dict[str, Any]:
    """What /metrics says is served: the labels of ``dualdeploy_model_info`` (bundle_version, variant,
    device_class, cpu_class, ...) plus ``quality_gate``, the figures of the on-device quality gate that
    the server passed at start-up on this device's kernels."""
    req = urllib.request.Request(f"{base}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        text = resp.read().decode()
    info: dict[str, Any] | None = None
    quality: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dualdeploy_model_info":
                info = dict(sample.labels)
            elif sample.name == "dualdeploy_quality_gate":
                quality[sample.labels["figure"]] = float(sample.value)
    if info is None:
        raise HealthGateError(f"{base}/metrics has no dualdeploy_model_info: cannot tell what is served")
    return {**info, "quality_gate": quality}


def golden_inference(
    base: str, bundle: Path, token: str | None, context: ssl.SSLContext | None
) -> dict[str, Any]:
    """Send the golden inputs; compare with the golden outputs under the served variant's tolerance."""
    manifest = read_manifest(bundle)
    model = manifest.model
    inputs = load_tensors(bundle / manifest.golden.inputs)
    reference = load_tensors(bundle / manifest.golden.outputs)
    # The v2 binary tensor extension, encoded by the contract's codec (the same as every client here).
    body, headers = encode_infer_request(inputs)
    started = time.perf_counter()
    _, raw, header_length = _request(
        f"{base}/v2/models/{model}/infer", token=token, context=context, data=body, headers=headers
    )
    latency_ms = (time.perf_counter() - started) * 1000
    answer, outputs = decode_infer_response(raw, header_length)
    info = served_info(base, token, context)
    if info.get("bundle_version") != manifest.version or answer.get("model_version") != manifest.version:
        raise HealthGateError(
            f"the server runs bundle {info.get('bundle_version')!r} (answer says "
            f"{answer.get('model_version')!r}), not {manifest.version!r}"
        )
    variants = {v.name: v for v in manifest.variants}
    name = info.get("variant")
    if name not in variants:
        raise HealthGateError(
            f"the server runs variant {name!r}, which is not in the manifest {sorted(variants)}"
        )
    actual = {out: np.asarray(array, dtype=np.float64) for out, array in outputs.items()}
    try:
        figures = compare_outputs(reference, actual, variants[name].tolerance.as_dict())
    except BundleError as exc:
        raise HealthGateError(f"golden output of variant {name} out of tolerance: {exc}") from exc
    if variants[name].quality is not None and not info["quality_gate"]:
        # The server refuses to become ready when the gate fails; a ready server without its figures
        # is one that never ran it.
        raise HealthGateError(
            f"variant {name} has an on-device quality set, but the server reports no quality gate figures"
        )
    return {
        "version": manifest.version,
        "model": model,
        "variant": name,
        "device_class": info.get("device_class"),
        "cpu_class": info.get("cpu_class"),
        "providers": info.get("providers"),
        "latency_ms": round(latency_ms, 2),
        "figures": figures,
        "quality_gate": info["quality_gate"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--bundle", type=Path, required=True, help="the release the server should serve")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    parser.add_argument("--token-file", type=Path, help="bearer token file")
    parser.add_argument("--log-file", type=Path, help="server log whose tail explains a failure")
    parser.add_argument("--cafile", type=Path, help="CA or self-signed certificate to trust for https")
    args = parser.parse_args()
    token = args.token_file.read_text().strip() if args.token_file else None
    context = None
    if args.url.startswith("https"):
        context = ssl.create_default_context(cafile=str(args.cafile) if args.cafile else None)
        # The server certificate names the site host; the gate talks to it over loopback.
        context.check_hostname = False
    try:
        waited = wait_ready(args.url, args.timeout, token, context)
        result = golden_inference(args.url, args.bundle.resolve(), token, context)
    except (HealthGateError, BundleError, OSError, KeyError, ValueError) as exc:
        tail = ""
        if args.log_file and args.log_file.is_file():
            lines = [ln for ln in args.log_file.read_text(errors="replace").splitlines() if ln.strip()]
            tail = " | server log: " + " / ".join(lines[-3:])[-600:]
        print(f"health gate failed: {exc}{tail}", file=sys.stderr)
        return 1
    result["ready_after_s"] = round(waited, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
