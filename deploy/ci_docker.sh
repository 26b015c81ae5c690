#!/usr/bin/env bash
# Docker where CI runs: a Debian host reaching only the package registries (no image registry). Steps, in the
# order given (default: all four):
#   packages  install Debian's docker.io, docker-compose and debootstrap where missing (as root)
#   daemon    start dockerd unless one answers (its pid in $DOCKERD_PID_FILE, its log in $DOCKERD_LOG)
#   base      make the base image $BASE_IMAGE unless it exists: debootstrap --variant=minbase bookworm, docker import
#   build     build deploy/Dockerfile.cpu on it as $IMAGE; pip gets the host's CA bundle as a build secret and,
#             where $TORCH_WHEELS holds a CPU torch wheel for Python 3.11, takes torch from there
#   stop      stop the dockerd that `daemon` started (no other)
#
#   deploy/ci_docker.sh packages daemon          # what .ci/run does before the tests
#   deploy/ci_docker.sh daemon base build        # what tests/deploy/test_docker.py does
#
# Environment: IMAGE (radixserve:cpu), BASE_IMAGE (radixserve-base:bookworm), NO_CACHE=1 (rebuild every layer),
# TORCH_WHEELS (/opt/wheels), BUILD_CACHE_KEEP (4GB: the build cache left after a build; the image $IMAGE
# named before a build is removed once the build replaces it), DOCKERD_LOG, DOCKERD_PID_FILE.
# Exit status: 0 done; 3 Docker cannot run here (the reason on stderr); 1 a step failed.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-radixserve:cpu}
BASE_IMAGE=${BASE_IMAGE:-radixserve-base:bookworm}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
BUILD_CACHE_KEEP=${BUILD_CACHE_KEEP:-4GB}
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/radixserve-dockerd.log}
DOCKERD_PID_FILE=${DOCKERD_PID_FILE:-/tmp/radixserve-dockerd.pid}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

say() { echo "ci_docker: $*" >&2; }
cannot() { say "Docker cannot run here: $*"; exit 3; }
timed() {  # timed STEP: run the step's function and say how long it took
  local start=$SECONDS
  "step_$1"
  say "$1 done in $((SECONDS - start)) s"
}
answers() { docker info >/dev/null 2>&1; }

step_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  ((${#missing[@]})) || return 0
  [[ $(id -u) == 0 ]] || cannot "${missing[*]} missing, and installing them needs root"
  command -v apt-get >/dev/null || cannot "${missing[*]} missing, and there is no apt-get"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

step_daemon() {
  answers && return 0
  command -v dockerd >/dev/null || cannot "no dockerd (deploy/ci_docker.sh packages installs it)"
  [[ $(id -u) == 0 ]] || cannot "no Docker daemon answers, and starting one needs root"
  setsid dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
  echo $! >"$DOCKERD_PID_FILE"
  for _ in $(seq 60); do
    answers && return 0
    kill -0 "$(cat "$DOCKERD_PID_FILE")" 2>/dev/null || break
    sleep 1
  done
  tail -n 20 "$DOCKERD_LOG" >&2 || true
  cannot "dockerd did not come up (log above, in full at $DOCKERD_LOG)"
}

step_base() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  local root
  root=$(mktemp -d /tmp/radixserve-rootfs.XXXXXX)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; return 1; }
  tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root" "$root.log"
}

step_build() {
  local previous
  previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [[ ${NO_CACHE:-0} == 1 ]] && args+=(--no-cache)
  [[ -s $CA_BUNDLE ]] && args+=(--secret "id=ca,src=$CA_BUNDLE")
  local wheel
  wheel=$(compgen -G "$TORCH_WHEELS/torch-*+cpu-cp311-*.whl" | head -n 1 || true)
  rm -rf .docker-wheels
  if [[ -n $wheel ]]; then  # bookworm's Python is 3.11; the wheel comes into the context, not the image
    mkdir .docker-wheels
    ln "$wheel" .docker-wheels/ 2>/dev/null || cp "$wheel" .docker-wheels/
    args+=(--build-arg PIP_WHEELS=.docker-wheels --build-arg TORCH_INDEX_URL=pip)
  fi
  # BuildKit (the mounts): Debian's 20.10 CLI has it built in; a newer CLI needs its buildx plugin
  local cli=docker
  [[ -x /usr/bin/docker ]] && ! docker buildx version >/dev/null 2>&1 && cli=/usr/bin/docker
  DOCKER_BUILDKIT=1 "$cli" build --progress=plain -t "$IMAGE" -f deploy/Dockerfile.cpu "${args[@]}" . \
    >/tmp/radixserve-docker-build.log 2>&1 || { tail -n 40 /tmp/radixserve-docker-build.log >&2; rm -rf .docker-wheels; return 1; }
  rm -rf .docker-wheels
  forget_previous_build "$previous"
}

# The install layer mounts the source, so every change of the tree rebuilds it (about 3 GB): without this
# each CI run would leave the last image untagged and its layers in the build cache until the disk fills.
forget_previous_build() {
  local previous=$1 current
  current=$(docker image inspect -f '{{.Id}}' "$IMAGE")
  if [[ -n $previous && $previous != "$current" ]]; then
    docker image rm "$previous" >/dev/null 2>&1 || say "kept the previous $IMAGE ($previous): a container uses it"
  fi
  docker builder prune -f --keep-storage "$BUILD_CACHE_KEEP" >/dev/null || say "could not prune the build cache"
}

step_stop() {
  [[ -s $DOCKERD_PID_FILE ]] || return 0
  local pid
  pid=$(cat "$DOCKERD_PID_FILE")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  rm -f "$DOCKERD_PID_FILE"
}

steps=("$@")
((${#steps[@]})) || steps=(packages daemon base build)
for step in "${steps[@]}"; do
  case $step in
    packages|daemon|base|build|stop) timed "$step" ;;
    *) say "unknown step $step (packages, daemon, base, build, stop)"; exit 2 ;;
  esac
done
