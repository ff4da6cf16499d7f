#!/usr/bin/env bash
# Unpacks the node packs that tests combine with ours (ComfyUI-GGUF, ComfyUI-AnimateDiff-Evolved)
# from source snapshots, once, into a cache folder (called by `make test`).
#
#   scripts/comfyui_packs_for_tests.sh PACKS_DIR SNAPSHOT...
#
# Each SNAPSHOT is a .tar.gz holding one folder (the pack, e.g. ComfyUI-GGUF/); it is unpacked to
# PACKS_DIR/<snapshot name without .tar.gz>/<that folder>. The unpacking goes through a temporary
# folder beside it, so a crashed or concurrent run never leaves half a tree. The tests find a pack
# by its folder name under PACKS_DIR (tests/comfy/comfy_env.py node_pack) and link it into the
# custom_nodes of the ComfyUI they start; nothing is installed into a ComfyUI checkout.
set -euo pipefail

packs=${1:?PACKS_DIR}
shift
mkdir -p "$packs"
for snapshot in "$@"; do
    name=$(basename "$snapshot" .tar.gz)
    dest="$packs/$name"
    if [[ -d "$dest" ]]; then
        continue
    fi
    tmp=$(mktemp -d "$dest.unpack.XXXXXX")
    echo "unpacking node pack $name into $packs"
    if ! tar -xzf "$snapshot" -C "$tmp"; then
        rm -rf "$tmp"
        echo "error: cannot unpack $snapshot" >&2
        exit 1
    fi
    if [[ $(find "$tmp" -mindepth 1 -maxdepth 1 -type d | wc -l) != 1 ]]; then
        rm -rf "$tmp"
        echo "error: $snapshot must hold exactly one folder (the node pack)" >&2
        exit 1
    fi
    mv "$tmp" "$dest"
done
