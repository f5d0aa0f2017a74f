"""The server on the prebuild's real bundles (demo CNN, MiniLM), when they have been built.

These bundles come from ``make bundles``, which ``make test`` runs first (or the folders named in
``SERVING_TEST_BUNDLES``, colon-separated, with ``SERVING_TEST_PUBLIC_KEY``); a missing one fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from serving_support import REPO, running_server

from contract.bundle import compare_outputs, load_tensors, read_manifest

_DEFAULT = [REPO / "dist" / "demo" / "latest", REPO / "dist" / "minilm" / "latest"]
BUNDLES = [Path(p) for p in os.environ.get("SERVING_TEST_BUNDLES", "").split(":") if p] or _DEFAULT
PUBLIC_KEY = Path(os.environ.get("SERVING_TEST_PUBLIC_KEY", REPO / ".keys" / "dev-ed25519.pub"))


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.parent.name for b in BUNDLES])
def test_real_bundle_serves_its_golden_outputs_over_binary_v2(bundle: Path, tmp_path: Path) -> None:
    # make test builds both bundles first (make bundles); a missing one is a broken set-up, not a skip.
    assert (bundle / "manifest.json").is_file(), f"{bundle} is not built: run make bundles"
    manifest = read_manifest(bundle)
    golden_in = load_tensors(bundle / manifest.golden.inputs)
    golden_out = load_tensors(bundle / manifest.golden.outputs)
    with running_server(bundle, PUBLIC_KEY, tmp_path) as proc:
        with proc.client() as http:
            info = http.get("/metrics").text
        variant = next(v for v in manifest.variants if f'variant="{v.name}"' in info)
        client = triton.InferenceServerClient(proc.base_url.removeprefix("http://"))
        try:
            tensors = []
            for spec in manifest.inputs:
                value = np.ascontiguousarray(golden_in[spec.name])
                tensor = triton.InferInput(
                    spec.name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT64"
                )
                tensor.set_data_from_numpy(value, binary_data=True)
                tensors.append(tensor)
            result = client.infer(manifest.model, tensors)
        finally:
            client.close()
    actual = {o.name: result.as_numpy(o.name) for o in manifest.outputs}
    expected = {o.name: golden_out[o.name] for o in manifest.outputs}
    compare_outputs(expected, actual, variant.tolerance.as_dict())
