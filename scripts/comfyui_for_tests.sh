#!/usr/bin/env bash
# Prepares the ComfyUI that the tests in tests/comfy run against (called by `make test`).
#
#   scripts/comfyui_for_tests.sh PYTHON COMFYUI_PATH [SNAPSHOT] [PYLIB]
#
# COMFYUI_PATH is the ComfyUI folder the tests will use. When it has no main.py yet and SNAPSHOT
# (a .tar.gz holding one folder ComfyUI/) is given, the snapshot is unpacked there: COMFYUI_PATH
# must then end in /ComfyUI; its parent is created, and the unpacking goes through a temporary
# folder beside it, so a crashed or concurrent run never leaves half a tree. Then ComfyUI's
# requirements are installed with PYTHON's pip, without torch, torchvision and torchaudio lines
# and with the installed torch pinned (ComfyUI's packages may not replace it). The filtered list
# is kept in the environment, so an unchanged ComfyUI costs no pip call on the next run. Also
# installs Debian's chromium for the browser test when it is missing and we are root.
#
# PYLIB given (a second, older ComfyUI release next to the main one): PYTHON's environment is left
# as the main ComfyUI set it; only this release's own `comfyui-*` packages (frontend, workflow
# templates, embedded docs, pinned in its requirements.txt) are installed, without dependencies,
# into the folder PYLIB, which the tests put first on that ComfyUI's PYTHONPATH.
#
#   scripts/comfyui_for_tests.sh --frontend PYTHON VERSION DIR
#
# installs comfyui-frontend-package==VERSION (the ComfyUI web app) without dependencies into DIR
# (through a temporary folder beside it; kept when DIR already holds that version): the browser
# test serves DIR/comfyui_frontend_package/static with ComfyUI's --front-end-root.
set -euo pipefail

if [[ "${1:-}" == --frontend ]]; then
    py=${2:?python}
    version=${3:?frontend version}
    dir=${4:?target folder}
    if [[ -d "$dir/comfyui_frontend_package-$version.dist-info" && -d "$dir/comfyui_frontend_package/static" ]]; then
        exit 0
    fi
    echo "installing comfyui-frontend-package==$version into $dir"
    mkdir -p "$(dirname "$dir")"
    fresh=$(mktemp -d "$dir.new.XXXXXX")
    trap 'rm -rf "$fresh"' EXIT
    "$py" -m pip install -q --no-deps --target "$fresh" "comfyui-frontend-package==$version"
    chmod 755 "$fresh"
    rm -rf "$dir"
    mv "$fresh" "$dir"
    trap - EXIT
    exit 0
fi

py=${1:?python}
comfy=${2:?COMFYUI_PATH}
snapshot=${3:-}
pylib=${4:-}

if [[ ! -f "$comfy/main.py" ]]; then
    if [[ -z "$snapshot" ]]; then
        echo "error: COMFYUI_PATH=$comfy has no main.py (point it at a ComfyUI checkout)" >&2
        exit 1
    fi
    if [[ "$(basename "$comfy")" != ComfyUI ]]; then
        echo "error: a snapshot unpacks to a folder named ComfyUI, not $comfy" >&2
        exit 1
    fi
    dest=$(dirname "$comfy")
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp -d "$dest.unpack.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "unpacking $(basename "$snapshot") into $dest"
    tar -xzf "$snapshot" -C "$tmp"
    if [[ ! -f "$tmp/ComfyUI/main.py" ]]; then
        echo "error: $snapshot holds no ComfyUI/main.py" >&2
        exit 1
    fi
    rm -rf "$dest"
    mv "$tmp" "$dest"
    trap - EXIT
fi

# The browser test (tests/comfy/test_browser.py) drives Debian's package chromium through
# playwright (no browser download): installed here when missing and we are root; otherwise that
# test skips with the reason (in CI, CI=true, it fails).
chromium=${TOMESD_EXT_CHROMIUM:-/usr/bin/chromium}
if [[ ! -x "$chromium" ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium for the browser test"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: no $chromium (as root: apt-get install chromium): the browser test will skip" >&2
    fi
fi

wanted=$(mktemp)
trap 'rm -f "$wanted"' EXIT

if [[ -n "$pylib" ]]; then
    grep -E '^\s*comfyui-' "$comfy/requirements.txt" > "$wanted"
    if cmp -s "$wanted" "$pylib/.comfyui-requirements.txt"; then
        exit 0
    fi
    echo "installing $(tr '\n' ' ' < "$wanted")into $pylib"
    fresh=$(mktemp -d "$pylib.new.XXXXXX")
    trap 'rm -f "$wanted"; rm -rf "$fresh"' EXIT
    "$py" -m pip install -q --no-deps --target "$fresh" -r "$wanted"
    cp "$wanted" "$fresh/.comfyui-requirements.txt"
    rm -rf "$pylib"
    mv "$fresh" "$pylib"
    exit 0
fi

env_dir=$("$py" -c 'import sys; print(sys.prefix)')
grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$comfy/requirements.txt" > "$wanted"
installed="$env_dir/comfyui-requirements.txt"
if cmp -s "$wanted" "$installed"; then
    exit 0
fi
pin="$env_dir/comfyui-constraints.txt"
# the public version (2.14.1, not 2.14.1+cu130): a local label in a constraint conflicts with
# plain version ranges of other constraints; == on the public version still keeps the build
"$py" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$pin"
echo "installing ComfyUI's requirements (keeping $(cat "$pin"))"
"$py" -m pip install -q -r "$wanted" -c "$pin"
cp "$wanted" "$installed"
