#!/usr/bin/env bash
# Build .whl/: the wheels the GPU machine (Python 3.12, x86-64, no internet) lacks to run radixserve.
#
#   scripts/build_gpu_wheels.sh            # from the repo root; safe to run again
#   WHEEL_DIR=/elsewhere scripts/build_gpu_wheels.sh
#
# The machine already has torch, triton, transformers and numpy (and their own needs: pyyaml, requests,
# tqdm, certifi, idna, ...), which are never fetched. Everything else radixserve imports is listed
# below with each of its dependencies, pinned to the versions installed where this was written, or a
# release with a cp312 manylinux wheel (orjson 3.8.3 has none: 3.13.0). --no-deps is used, so a new
# dependency must be added here by hand; the closure check at the end names any that are missing.
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail

cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-python3}

PACKAGES=(
  # HTTP server: fastapi + uvicorn[standard]'s fast loop and parser
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  typing-extensions==4.16.0
  uvicorn==0.54.0 click==8.5.1 h11==0.16.0 uvloop==0.23.0 httptools==0.9.0
  anyio==4.16.0 sniffio==1.3.1
  # IPC, serialisation, metrics, process control
  pyzmq==27.3.0 msgspec==0.23.0 orjson==3.13.0 prometheus-client==0.26.0 psutil==7.2.2
  # model files and structured output
  gguf==0.19.0 xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
  # clients used by bench_serving and the tests
  openai==3.54.0 jiter==0.19.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
  httpx==0.28.1 httpcore==1.0.9
  aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0
  multidict==7.2.1 propcache==0.5.4 yarl==1.25.1
)

mkdir -p "$WHEEL_DIR"

have_wheel() {  # a wheel of exactly this name and version is already in the folder
  local name=${1%%==*} version=${1##*==}
  local stem
  stem=$(echo "$name" | tr '[:upper:]-.' '[:lower:]__')
  compgen -G "$WHEEL_DIR/${stem}-${version}-*.whl" >/dev/null \
    || compgen -G "$WHEEL_DIR/$(echo "$name" | tr '-' '_')-${version}-*.whl" >/dev/null
}

for spec in "${PACKAGES[@]}"; do
  if have_wheel "$spec"; then
    continue
  fi
  echo "fetching $spec"
  # pip's output only matters when it fails
  if ! log=$("$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$WHEEL_DIR" "$spec" 2>&1); then
    echo "$log" >&2
    exit 1
  fi
done

# One version per package (two stop the whole install), nothing unlisted, every dependency present.
"$PYTHON" - "$WHEEL_DIR" "${PACKAGES[@]}" <<'EOF'
import glob, os, re, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, specs = sys.argv[1], sys.argv[2:]
wanted = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in specs}
# on the GPU machine already (its image), or never needed there
present = {canonicalize_name(n) for n in (
    "torch triton transformers numpy pyyaml requests tqdm certifi idna urllib3 charset-normalizer "
    "filelock packaging").split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
found, problems = {}, []
for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
    name, version, _, _ = parse_wheel_filename(os.path.basename(path))
    if name in found:
        problems.append(f"two versions of {name}: {found[name][0]} and {version}")
    elif wanted.get(name) != str(version):
        problems.append(f"{os.path.basename(path)} is not listed (stale? delete it)")
    found[name] = (str(version), path)
for name, version in wanted.items():
    if name not in found:
        problems.append(f"{name}=={version} was not fetched")
for name, (_, path) in found.items():
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # extras and other platforms
        dep = canonicalize_name(req.name)
        if dep not in found and dep not in present:
            problems.append(f"{name} needs {req}, which is neither here nor on the GPU machine")
if problems:
    sys.exit("build_gpu_wheels: " + "\n  ".join(["problems:", *problems]))
print(f"{len(found)} wheels, dependencies closed")
EOF
du -sh "$WHEEL_DIR"
