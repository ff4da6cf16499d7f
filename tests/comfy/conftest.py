"""Fixtures of the ComfyUI tests: skip without COMFYUI_PATH (the older-release ones without
COMFYUI_OLD_PATH), the browser tests without Chromium
or playwright (in CI, CI=true: fail); a cached
random SD1.5 checkpoint; one ComfyUI server per session (loopback, --cpu, temp base dir),
stopped at teardown.

The SD1.5 checkpoint is full size (~2 GB in fp16): run these tests under
``flock /tmp/tomesd_heavy.lock`` on shared machines. It is cached in $TOMESD_EXT_CACHE
(default ~/.cache/tomesd_ext) keyed by a fingerprint of the builders.
"""

import os

import pytest

from comfy_browser import chromium_missing
from comfy_env import ComfyServer, comfyui_path, missing_reason, old_comfyui_path, old_missing_reason

CKPT_NAME = "tomesd_ext_sd15_random.safetensors"
# SD1.5 widths, UNet cut to one level (tomesd_ext.models.configs "sd15-1level"): ComfyUI loads it as
# SD1.5; for tests whose cost grows with the UNet's size (inductor compiling it)
CKPT_1LEVEL_NAME = "tomesd_ext_sd15_1level_random.safetensors"


def _skip_or_fail(items, marker, reason, what):
    marked = [item for item in items if marker in item.keywords]
    if marked and os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        # CI must run them: a missing ComfyUI or browser there is a broken setup, not a reason to skip
        raise pytest.UsageError(f"CI: {len(marked)} {what} tests cannot run: {reason}")
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_modifyitems(config, items):
    if old_comfyui_path() is None:
        _skip_or_fail(items, "comfyui_old", old_missing_reason(), "older-ComfyUI")
    if comfyui_path() is None:
        _skip_or_fail(items, "comfyui", missing_reason(), "ComfyUI")
        return
    reason = chromium_missing()
    if reason:
        _skip_or_fail(items, "browser", reason, "browser")


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: needs a ComfyUI checkout in COMFYUI_PATH")
    config.addinivalue_line("markers", "comfyui_old: needs the older ComfyUI release in COMFYUI_OLD_PATH")
    config.addinivalue_line("markers", "browser: needs Chromium (Debian package) and playwright")


def _cached(name):
    from tomesd_ext.models.checkpoint import cached_checkpoint

    cache = os.environ.get("TOMESD_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tomesd_ext")
    return cached_checkpoint(cache, name, seed=0)


@pytest.fixture(scope="session")
def sd15_checkpoint():
    return _cached("sd15")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    server = ComfyServer(str(tmp_path_factory.mktemp("comfyui_base")))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sd15_server(comfy_server, sd15_checkpoint):
    """The server with the random SD1.5 checkpoint in models/checkpoints as CKPT_NAME."""
    comfy_server.add_checkpoint(CKPT_NAME, sd15_checkpoint)
    return comfy_server


@pytest.fixture(scope="session")
def sd15_1level_server(comfy_server):
    """The server with the one-level SD1.5-width checkpoint in models/checkpoints as CKPT_1LEVEL_NAME."""
    comfy_server.add_checkpoint(CKPT_1LEVEL_NAME, _cached("sd15-1level"))
    return comfy_server


@pytest.fixture(scope="session")
def object_info(comfy_server):
    return comfy_server.get("/object_info")
