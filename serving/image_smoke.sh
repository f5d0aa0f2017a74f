#!/usr/bin/env bash
# Build the CPU serving image without any registry, run it, and prove it serves.
#
# No registry is reachable here, so the base image is made locally: Debian bookworm (whose
# python3 is 3.11) by debootstrap from the Debian mirror, imported into buildah. The wheels
# come from the host's pip into dist/wheelhouse and are installed offline in the build.
# Then: start the image (buildah run, chroot isolation, host network), wait for
# /v2/health/ready, run the image's HEALTHCHECK command, send one inference, SIGTERM, and
# require a clean exit.
#
# Needs root, buildah and debootstrap (apt-get install buildah debootstrap) and a built bundle.
# Usage: serving/image_smoke.sh [BUNDLE_DIR]   (default dist/demo/latest)
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE="$(realpath --relative-to=. "${1:-dist/demo/latest}")"
BASE_IMAGE=localhost/dualdeploy-base:py311-bookworm
IMAGE=localhost/dualdeploy-serving:smoke
PORT="${PORT:-18000}"
PY="${PY:-.venv/bin/python}"
MODEL="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1] + "/manifest.json"))["model"])' "$BUNDLE")"

if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    rootfs="$(mktemp -d)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >/dev/null
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/*
    ctr="$(buildah from scratch)"
    cp -a "$rootfs"/. "$(buildah mount "$ctr")"/
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit -q "$ctr" "$BASE_IMAGE" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -rf "$rootfs"
fi

"$PY" -m pip download -q -r serving/requirements.txt -d dist/wheelhouse

buildah bud --isolation chroot --layers --format docker -f serving/Dockerfile \
    --build-arg BASE=cpu --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg WHEELHOUSE=dist/wheelhouse \
    --build-arg BUNDLE="$BUNDLE" --build-arg PUBLIC_KEY="${PUBLIC_KEY:-.keys/dev-ed25519.pub}" \
    -t "$IMAGE" .

ctr="$(buildah from "$IMAGE")"
log="$(mktemp)"
cleanup() { buildah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT
started=$(date +%s.%N)
buildah run --isolation chroot --env DUALDEPLOY_PORT="$PORT" "$ctr" -- python3 -m serving >"$log" 2>&1 &
runner=$!
for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null; then break; fi
    sleep 0.1
done
curl -sf "http://127.0.0.1:$PORT/v2/health/ready"
echo " ready after $(echo "$(date +%s.%N) - $started" | bc) s (container start included)"
buildah run --isolation chroot --env DUALDEPLOY_PORT="$PORT" "$ctr" -- python3 -m serving.healthcheck
echo "HEALTHCHECK command: ok"
"$PY" - "$PORT" "$MODEL" "$BUNDLE" <<'EOF'
import json, sys, urllib.request
import numpy as np
from contract.bundle import load_tensors
port, model, bundle = sys.argv[1], sys.argv[2], sys.argv[3]
manifest = json.load(open(f"{bundle}/manifest.json"))
golden = load_tensors(__import__("pathlib").Path(bundle) / manifest["golden"]["inputs"])
body = {"inputs": [{"name": t["name"], "shape": list(golden[t["name"]][:1].shape),
                    "datatype": "FP32" if t["dtype"] == "float32" else "INT64",
                    "data": golden[t["name"]][:1].ravel().tolist()} for t in manifest["inputs"]]}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=30))["outputs"][0]
print("inference: ok", out["name"], out["shape"])
EOF
pid="$(ss -ltnpH "sport = :$PORT" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)"
[ "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")" = 10001 ] && echo "runs as uid 10001: ok"
kill -TERM "$pid"
wait "$runner"
echo "SIGTERM: exit $?"
grep -q '"Finished server process' "$log" && echo "drained and finished: ok"
