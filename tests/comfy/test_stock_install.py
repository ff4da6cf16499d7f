"""A stock install: the pack in ComfyUI (COMFYUI_PATH) with only what ComfyUI itself installs.
diffusers and transformers (the library's [diffusers] extra) are blocked: the pack is imported
the way ComfyUI imports a custom node folder, registers its nodes through comfy_entrypoint, and
each node runs in ComfyUI's sampler on a tiny model (tests/comfy/pack_probe.py, in a process of
its own)."""

import pytest

from comfy_env import check_pack_probe, comfyui_path, run_pack_probe

pytestmark = pytest.mark.comfyui


def test_pack_loads_and_runs_without_diffusers_and_transformers():
    check_pack_probe(run_pack_probe(comfyui_path()), comfyui_path())
