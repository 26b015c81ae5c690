#!/usr/bin/env bash
# Build .whl/: the wheels the GPU machine (Python 3.12, x86-64, no internet) lacks to run radixserve.
#
#   scripts/build_gpu_wheels.sh            # from the repo root; safe to run again
#   WHEEL_DIR=/elsewhere scripts/build_gpu_wheels.sh
#   WHEEL_SET=pd scripts/build_gpu_wheels.sh   # build/whl-pd/: the set scripts/run_gpu_pd_bench.sh installs
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
WHEEL_SET=${WHEEL_SET:-base}
case $WHEEL_SET in
  base) WHEEL_DIR=${WHEEL_DIR:-.whl} ;;
  pd) WHEEL_DIR=${WHEEL_DIR:-build/whl-pd} ;;  # under /build/ (ignored): .whl/ stays the base set
  *) echo "build_gpu_wheels: WHEEL_SET is base or pd, not $WHEEL_SET" >&2; exit 1 ;;
esac
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

# WHEEL_SET=pd: a prefill and a decode server on one GPU behind SGLang's router (scripts/run_gpu_pd_bench.sh).
# The device tool carries 64 MiB in all, and Mooncake's CUDA 13 wheel alone is 50 MB, SGLang's router 31 MB,
# so this set leaves out what neither the servers, the router nor bench_serving import (the openai client
# and its HTTP stack, httpx, gguf: the tests and GGUF files need them) and cuts the Mooncake wheel down to
# its transfer engine (mooncake/engine.so and the libraries it links, 9 MB; the store, EP, collective and
# bench binaries are the rest). Mooncake also links the system's libibverbs.so.1, libmlx5.so.1 and
# libnuma.so.1, even for TCP: scripts/run_gpu_pd_bench.sh says which ones a machine lacks.
PD_LEAVE_OUT=(openai jiter httpx2 httpcore2 truststore httpx httpcore gguf)
PD_EXTRA=(
  mooncake-transfer-engine-cuda13==0.3.14   # Mooncake's transfer engine built for CUDA 13 (the machine's)
  sglang-router==0.3.2 setproctitle==1.3.8  # SGLang's router (Rust), as tests/e2e/test_disaggregation.py uses
)
if [[ $WHEEL_SET == pd ]]; then
  kept=()
  for spec in "${PACKAGES[@]}"; do
    [[ " ${PD_LEAVE_OUT[*]} " == *" ${spec%%==*} "* ]] || kept+=("$spec")
  done
  PACKAGES=("${kept[@]}" "${PD_EXTRA[@]}")
fi

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

if [[ $WHEEL_SET == pd ]]; then
  # Mooncake's transfer engine alone, rewritten in place under the wheel's own name (RECORD rebuilt)
  "$PYTHON" - "$WHEEL_DIR"/mooncake_transfer_engine_cuda13-*.whl <<'EOF'
import base64, hashlib, os, sys, zipfile

path = sys.argv[1]
KEEP = {"mooncake/__init__.py", "mooncake/engine.so", "mooncake/engine.pyi", "mooncake/py.typed",
        "mooncake/libasio.so", "mooncake/libetcd_wrapper.so"}
LIBS = ("libyaml-cpp", "libjsoncpp", "libglog", "libgflags")  # what engine.so links from the .libs folder
with zipfile.ZipFile(path) as z:
    names = z.namelist()
    if not any(n.endswith(".dist-info/entry_points.txt") for n in names):
        sys.exit(0)  # cut down already
    kept = [z.getinfo(n) for n in names
            if n in KEEP or (".libs/" in n and n.rsplit("/", 1)[-1].startswith(LIBS))
            or (".dist-info/" in n and not n.endswith(("/RECORD", "/entry_points.txt")))]
    missing = KEEP - {i.filename for i in kept}
    if missing or sum(".libs/" in i.filename for i in kept) != len(LIBS):
        sys.exit(f"build_gpu_wheels: {os.path.basename(path)} is not laid out as expected "
                 f"(missing {sorted(missing)} or one of {LIBS})")
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    data = [(i, z.read(i)) for i in kept]
rows = [f"{i.filename},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
        for i, b in data] + [f"{record},,"]
tmp = path + ".tmp"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for info, b in data:  # the original entries: names, modes (the .so files' x bit), compression
        out.writestr(info, b)
    out.writestr(record, "\n".join(rows) + "\n")
os.replace(tmp, path)
print(f"{os.path.basename(path)}: cut down to its transfer engine, {os.path.getsize(path) / 1e6:.1f} MB")
EOF
fi

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
    "filelock packaging msgpack").split()}
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
