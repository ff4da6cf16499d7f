"""The V3 layer (nodes/v3.py) in ComfyUI's own comfy_api, in-process: the schemas ComfyUI derives
equal the node definitions, the entry point lists the four nodes, execution and validation go
through the definitions."""

import asyncio
import importlib
import os
import sys

import pytest

from comfy_env import REPO, fake_dit_model, import_comfy, node_defaults

import nodes

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def v3():
    import_comfy()
    return importlib.import_module("nodes.v3")


def _served_form(spec):
    """A definition's input spec as ComfyUI's V3 layer states it (a combo: "COMBO" + options)."""
    kind, opts = spec
    if isinstance(kind, list):
        return "COMBO", {**opts, "options": kind}
    return kind, opts


def test_schemas_equal_the_definitions(v3):
    assert [c.GET_SCHEMA().node_id for c in v3.V3_NODES] == list(nodes.NODE_DEFINITIONS)
    for cls in v3.V3_NODES:
        schema = cls.GET_SCHEMA()
        definition = nodes.NODE_DEFINITIONS[schema.node_id]
        assert cls.DEFINITION is definition
        assert schema.display_name == nodes.DISPLAY_NAMES[schema.node_id]
        assert (cls.CATEGORY, cls.DESCRIPTION) == (definition.CATEGORY, definition.DESCRIPTION)
        assert list(cls.RETURN_TYPES) == ["MODEL"] and list(cls.RETURN_NAMES) == ["model"]
        assert list(cls.OUTPUT_TOOLTIPS) == list(definition.OUTPUT_TOOLTIPS)
        served, declared = cls.INPUT_TYPES()["required"], definition.INPUT_TYPES()["required"]
        assert list(served) == list(declared)
        for name, spec in declared.items():
            kind, opts = _served_form(spec)
            assert served[name][0] == kind, name
            for key, value in opts.items():
                assert served[name][1][key] == value, (name, key)
        if "seed" in served:
            assert served["seed"][1]["control_after_generate"] is False


def test_entrypoint_lists_the_nodes(v3):
    spec = importlib.util.spec_from_file_location("tomesd_ext_pack", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack  # as ComfyUI imports custom_nodes/<folder>
    spec.loader.exec_module(pack)
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # else ComfyUI ignores comfy_entrypoint
    extension = asyncio.run(pack.comfy_entrypoint())
    listed = asyncio.run(extension.get_node_list())
    assert [c.GET_SCHEMA().node_id for c in listed] == list(nodes.NODE_DEFINITIONS)


def test_execute_and_validate_go_through_the_definition(v3, caplog):
    model = fake_dit_model()
    for cls in v3.V3_NODES:
        values = node_defaults(cls.DEFINITION)
        out = cls.EXECUTE_NORMALIZED(model=model, **values)
        assert out.result == (model,)  # not a UNet: passed through, with a warning
    assert caplog.text.count("cannot patch FakeDiT") == len(v3.V3_NODES)
    assert "sx*sy" in v3.TomesdExtTokenMerging.validate_inputs(sx=1, sy=1)
    assert "must not exceed" in v3.TomesdExtTokenMergingSimple.validate_inputs(start_percent=0.9, end_percent=0.1)
    assert "frame_reach=0" in v3.TomesdExtTokenMerging.validate_inputs(st=2, frame_reach=0)
    assert "must not exceed" in v3.TomesdExtImportanceMerging.validate_inputs(start_percent=0.9, end_percent=0.1)
    assert "out of range" in v3.TomesdExtVidToMe.validate_inputs(end_percent=1.5)
    assert v3.TomesdExtVidToMe.validate_inputs(start_percent=0.2, end_percent=0.8) is True


def test_unknown_spec_options_are_refused(v3):
    with pytest.raises(TypeError, match="display"):
        v3.v3_input("x", ("INT", {"default": 0, "min": 0, "max": 1, "tooltip": "t", "display": "slider"}))
    with pytest.raises(TypeError, match="no V3 input"):
        v3.v3_input("x", ("STRING", {"tooltip": "t"}))
