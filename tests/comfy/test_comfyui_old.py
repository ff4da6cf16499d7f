"""Smoke tests on an older ComfyUI release (COMFYUI_OLD_PATH; tested: v0.3.64, the oldest release
the pack supports), beside the full suite on COMFYUI_PATH: the pack loads there and registers its
nodes (V3 comfy_entrypoint), each node runs in-process on a tiny model (its own process: a
ComfyUI is imported once per process), and one SD 1.5 workflow runs through that release's
server at 64 px. The release's own frontend packages come first on its path (COMFYUI_OLD_PYLIB,
see `make comfyui`)."""

import json

import pytest

from comfy_env import (
    ComfyServer,
    check_pack_probe,
    load_workflow,
    old_comfyui_path,
    old_comfyui_pylib,
    release_of,
    run_pack_probe,
)
from conftest import CKPT_1LEVEL_NAME, _cached
from test_server import SIZE, _small

import nodes

pytestmark = pytest.mark.comfyui_old


def test_pack_loads_and_each_node_runs_in_process():
    check_pack_probe(run_pack_probe(old_comfyui_path(), old_comfyui_pylib()), old_comfyui_path())


@pytest.fixture(scope="module")
def old_server(tmp_path_factory):
    server = ComfyServer(str(tmp_path_factory.mktemp("comfyui_old_base")), comfy_path=old_comfyui_path(),
                         pythonpath=old_comfyui_pylib())
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_sd15_workflow_through_the_server(old_server):
    """The shipped SD 1.5 ToMe workflow on the one-level SD1.5-width random checkpoint, 64 px, 2 steps."""
    from PIL import Image

    log = old_server.read_log()
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "tomesd-ext" in line], log[-3000:]
    assert f"ComfyUI version: {release_of(old_comfyui_path())}" in log
    if old_comfyui_pylib():  # the release's own frontend, not the main environment's newer one
        assert f"web root: {old_comfyui_pylib()}" in log
    assert "Unable to parse pyproject.toml" not in log  # our [tool.comfy] as that release reads it
    assert "has no V3 node API" not in log  # the pack's own too-old check stays quiet there
    info = old_server.get("/object_info")
    assert all(node_id in info for node_id in nodes.NODE_DEFINITIONS), sorted(k for k in info if "Tomesd" in k)
    old_server.add_checkpoint(CKPT_1LEVEL_NAME, _cached("sd15-1level"))
    prompt = _small(load_workflow("sd15_txt2img_tome.api.json"), "tests/old_release")
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = CKPT_1LEVEL_NAME
    entry = old_server.run_prompt(prompt)
    files = old_server.output_files(entry)
    assert len(files) == 1, json.dumps(entry)[:2000]
    with Image.open(files[0]) as img:
        assert img.size == (SIZE, SIZE)
    assert "tomesd-ext: token merging skipped" not in old_server.read_log()
