#!/usr/bin/env bash
# Run SGLang's OpenAI-server test files, unchanged, against radixserve (see README.md next to this file).
#   tests/sglang_compat/run.sh /tmp/sglang_openai_tests [--out DIR] [--timeout-per-file S] [--only SUBSTR...]
#                              [--unknown-flags pass|drop]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$repo/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$repo/.venv/bin/activate"
fi
if [ $# -lt 1 ]; then
  echo "usage: $0 TESTS_DIR [options]   (python $here/run.py --help for the options)" >&2
  exit 2
fi
exec python "$here/run.py" "$@"
