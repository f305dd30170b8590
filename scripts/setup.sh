#!/usr/bin/env bash
# Install what sluice needs on a fresh Debian/Ubuntu machine: the system tools it starts or
# calls (redis-server, zstd, kcat; with --test also docker-compose, prometheus, what the
# multi-host tests need: iproute2, iptables, bindfs, faketime, and GNU time for bench/fetch.py),
# and a virtualenv in .venv with sluice, its pinned runtime packages and the pinned development
# ones (pyproject.toml, extra "dev": the local broker, the tests, the lint gate), installed with
# uv. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v redis-server >/dev/null || packages+=(redis-server)
command -v zstd >/dev/null || packages+=(zstd)
command -v kcat >/dev/null || packages+=(kcat)
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [[ "${1:-}" == "--test" ]]; then
  command -v docker-compose >/dev/null || packages+=(docker-compose)
  command -v promtool >/dev/null || packages+=(prometheus)
  command -v ip >/dev/null || packages+=(iproute2)
  command -v iptables >/dev/null || packages+=(iptables)
  command -v bindfs >/dev/null || packages+=(bindfs fuse3)
  command -v faketime >/dev/null || packages+=(faketime)
  [[ -x /usr/bin/time ]] || packages+=(time)  # bench/fetch.py: each reader's peak memory
fi
if ((${#packages[@]})); then
  sudo=""
  [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
  echo "installing ${packages[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
# uv installs the same pins as pip in a few seconds where pip takes about a minute (most of a CI
# run's set-up). It reads PyPI (or UV_INDEX_URL), not pip's configuration. It compiles the
# bytecode at install, as pip does: with PYTHONDONTWRITEBYTECODE set (as on CI) every process
# would otherwise compile its imports again, which doubled the suite's CPU time.
[[ -x .venv/bin/uv ]] || .venv/bin/python -m pip install -q --disable-pip-version-check uv==0.13.9
.venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode -e '.[dev]'
