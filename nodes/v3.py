"""The nodes as ComfyUI sees them: V3 node API (``comfy_api``), pinned to the versioned namespace
``comfy_api.v0_0_2`` (``latest`` may change without warning).

Each V3 class is generated from its ComfyUI-free definition (nodes/tome.py, importance.py,
vidtome.py): the schema from the definition's inputs (built from the core's option tables), the
execution and the validation call the definition. This module imports ComfyUI; the root
``__init__.py`` imports it only when ComfyUI calls ``comfy_entrypoint``.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from . import DISPLAY_NAMES
from .importance import TomesdExtImportanceMerging as ImportanceDefinition
from .tome import TomesdExtTokenMerging as ToMeDefinition
from .tome import TomesdExtTokenMergingSimple as ToMeSimpleDefinition
from .vidtome import TomesdExtVidToMe as VidToMeDefinition


def v3_input(name, spec):
    """The V3 input of a classic input spec (name, (type, options)); every option is carried
    over or the spec is refused, so nothing of the definition is dropped silently."""
    kind, opts = spec
    opts = dict(opts)
    common = {"tooltip": opts.pop("tooltip")}
    if isinstance(kind, list):
        made = io.Combo.Input(name, options=kind, default=opts.pop("default"), **common)
    elif kind == "BOOLEAN":
        made = io.Boolean.Input(name, default=opts.pop("default"), **common)
    elif kind == "INT":
        made = io.Int.Input(name, default=opts.pop("default"), min=opts.pop("min"), max=opts.pop("max"),
                            control_after_generate=opts.pop("control_after_generate", None), **common)
    elif kind == "FLOAT":
        made = io.Float.Input(name, default=opts.pop("default"), min=opts.pop("min"), max=opts.pop("max"),
                              step=opts.pop("step"), **common)
    elif kind == "MODEL":
        made = io.Model.Input(name, **common)
    else:
        raise TypeError(f"{name}: no V3 input for type {kind!r}")
    if opts:
        raise TypeError(f"{name}: options {sorted(opts)} have no V3 counterpart here")
    return made


def schema_of(node_id, definition) -> io.Schema:
    """The V3 schema of a node definition (inputs in INPUT_TYPES order, one MODEL output)."""
    return io.Schema(
        node_id=node_id,
        display_name=DISPLAY_NAMES[node_id],
        category=definition.CATEGORY,
        description=definition.DESCRIPTION,
        inputs=[v3_input(name, spec) for name, spec in definition.INPUT_TYPES()["required"].items()],
        outputs=[io.Model.Output(display_name=definition.RETURN_NAMES[0], tooltip=definition.OUTPUT_TOOLTIPS[0])],
    )


# No node class derives from another: ComfyUI caches a node's schema fields (description,
# return types, ...) on the class, and a subclass would inherit its parent's. The shared parts
# are plain mixins. Each validate_inputs names its inputs (no **kwargs): ComfyUI skips its own
# min/max check of every input the function receives, and the definition's VALIDATE_INPUTS
# range-checks those itself.

class _Execute:
    @classmethod
    def define_schema(cls):
        return schema_of(cls.NODE_ID, cls.DEFINITION)

    @classmethod
    def execute(cls, model, **widgets):
        return io.NodeOutput(cls.DEFINITION().patch(model, **widgets)[0])


class TomesdExtTokenMerging(_Execute, io.ComfyNode):
    NODE_ID, DEFINITION = "TomesdExtTokenMerging", ToMeDefinition

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0, sx=2, sy=2, st=2, frame_reach=-1):
        return cls.DEFINITION.VALIDATE_INPUTS(start_percent=start_percent, end_percent=end_percent, sx=sx, sy=sy,
                                              st=st, frame_reach=frame_reach)


class TomesdExtTokenMergingSimple(_Execute, io.ComfyNode):
    NODE_ID, DEFINITION = "TomesdExtTokenMergingSimple", ToMeSimpleDefinition

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0):
        return cls.DEFINITION.VALIDATE_INPUTS(start_percent=start_percent, end_percent=end_percent)


class TomesdExtImportanceMerging(_Execute, io.ComfyNode):
    NODE_ID, DEFINITION = "TomesdExtImportanceMerging", ImportanceDefinition

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0, sx=2, sy=2):
        return cls.DEFINITION.VALIDATE_INPUTS(start_percent=start_percent, end_percent=end_percent, sx=sx, sy=sy)


class TomesdExtVidToMe(_Execute, io.ComfyNode):
    NODE_ID, DEFINITION = "TomesdExtVidToMe", VidToMeDefinition

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0):
        return cls.DEFINITION.VALIDATE_INPUTS(start_percent=start_percent, end_percent=end_percent)


V3_NODES = [TomesdExtTokenMergingSimple, TomesdExtTokenMerging, TomesdExtImportanceMerging, TomesdExtVidToMe]


class TomesdExtExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(V3_NODES)
