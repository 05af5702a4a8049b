#!/usr/bin/env bash
# One entry point for set-up on a fresh machine (needs only python3.11 with venv):
#   ./run.sh demo [--ckpt PATH]   create .venv if needed, then run the whole demo flow
#   ./run.sh test                 create both environments if needed, then run every test
#   ./run.sh env                  only create/refresh the environments
# Environments are rebuilt when their requirement files change (stamp = hash of the files).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# torch is installed on its own line: the pins in requirements*.txt mirror the WebUI's, torch does not.
MAIN_TORCH="torch==2.14.1 torchvision==0.29.1"
HOST_TORCH="torch==2.1.2 torchvision==0.16.2"   # what WebUI v1.10.1 runs our core on

make_env() {  # make_env DIR "TORCH PINS" REQUIREMENT-FILES...
  local dir=$1 torch=$2; shift 2
  local stamp
  stamp=$(cat "$@" <(echo "$torch") | sha256sum | cut -c1-16)
  if [ -f "$dir/.alchemy-stamp" ] && [ "$(cat "$dir/.alchemy-stamp")" = "$stamp" ]; then
    return 0
  fi
  echo "== setting up $dir ($torch)" >&2
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check $torch
  local req
  for req in "$@"; do  # *-nodeps.txt: wheels we need a file from, not their dependencies
    case "$req" in
      *-nodeps.txt) "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$req" ;;
      *) "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$req" ;;
    esac
  done
  "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$stamp" > "$dir/.alchemy-stamp"
}

main_env() { make_env .venv "$MAIN_TORCH" requirements.txt requirements-test.txt requirements-test-nodeps.txt requirements-e2e.txt; }

# The browser test drives Debian's chromium; install it when we can (root with apt), else that test skips.
browser() {
  command -v chromium >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium for the browser test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "== chromium not installed and no root/apt: the browser test will be skipped" >&2
  fi
}
# The WebUI's torch with the core's dependencies (no gradio: the host brings its own).
host_env() { make_env .venv-torch21 "$HOST_TORCH" requirements-core.txt requirements-test.txt requirements-test-nodeps.txt; }

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    main_env
    exec .venv/bin/python -m extensions_lib demo "$@"
    ;;
  test)
    main_env
    host_env
    browser
    echo "== tests on torch 2.14 (everything)" >&2
    .venv/bin/python -m pytest "$@"
    echo "== core tests on the WebUI's torch 2.1.2" >&2
    .venv-torch21/bin/python -m pytest -m "not needs_gradio" "$@"
    ;;
  env)
    main_env
    host_env
    ;;
  *)
    sed -n '2,6p' "$0" >&2
    exit 2
    ;;
esac
