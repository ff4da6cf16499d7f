"""One table of options (core.TOME_OPTIONS, VIDTOME_OPTIONS, TODO_OPTIONS) behind the apply_*
signatures, the validation, the ComfyUI widgets and the README tables: any drift fails here."""

import inspect
import os
import subprocess
import sys

import pytest

from nodes.base import INT_MAX, NODE_SEED_DEFAULT
from nodes.importance import TomesdExtImportanceMerging
from nodes.tome import TomesdExtTokenMerging, TomesdExtTokenMergingSimple
from nodes.vidtome import TomesdExtVidToMe
from tomesd_ext.core import TODO_OPTIONS, TOME_OPTIONS, VIDTOME_OPTIONS, OptionError, ToDoOptions, ToMeOptions, VidToMeOptions
from tomesd_ext.core.options import MIN_TOKENS_DEFAULT
from tomesd_ext.diffusers import apply_todo, apply_tome, apply_vidtome

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = [
    (TOME_OPTIONS, ToMeOptions, apply_tome, {"mode": "importance"}),
    (VIDTOME_OPTIONS, VidToMeOptions, apply_vidtome, {}),
    (TODO_OPTIONS, ToDoOptions, apply_todo, {}),
]


@pytest.mark.parametrize("table, options, apply, _extra", CASES)
def test_dataclass_and_apply_signature_defaults_are_the_table(table, options, apply, _extra):
    fields = options.__dataclass_fields__
    assert set(fields) == set(table)
    params = inspect.signature(apply).parameters
    for name, option in table.items():
        assert fields[name].default == option.default, name
        assert params[name].default == option.default, name


def _edge_values(option):
    """(allowed, refused) values at the edges of an option's range."""
    if option.kind == "int":
        ok = [option.lo] + ([option.hi] if option.hi is not None else [])
        bad = [option.lo - 1, 1.5] + ([option.hi + 1] if option.hi is not None else [])
        return ok, bad
    if option.kind == "choice":
        return list(option.choices), ["nope", 3]
    if option.kind == "bool":
        return [True, False], [1, "yes"]
    if option.kind == "seed":
        return [None, 0, 7], [-1, 1.5]
    ok = [option.lo] + ([] if option.hi_open else [option.hi])
    return ok, [option.lo - 0.01, option.hi if option.hi_open else option.hi + 0.01, "x"]


@pytest.mark.parametrize("table, options, _apply, extra", CASES)
def test_validation_follows_the_table_ranges(table, options, _apply, extra):
    for name, option in table.items():
        if name in ("sx", "sy", "ratio", "local_ratio", "global_ratio", "frame_reach", "block_ratios", "max_error"):
            continue  # coupled or clamped limits: tested in test_options_and_grid, test_video_dit, test_schedule
        ok, bad = _edge_values(option)
        kw = dict(extra) if name in ("pool_factor", "prune_steps", "cfg_layout") else {}
        if name == "merge_attn":
            kw["merge_mlp"] = True  # something else to merge when merge_attn is False
        for value in ok:
            options.create(**kw, **{name: value})
        for value in bad:
            with pytest.raises(OptionError, match=name):
                options.create(**kw, **{name: value})


def _check_widget(option, spec, node_default=None):
    kind, extra = spec
    assert extra["tooltip"] == option.help or extra["tooltip"] == option.help.replace("None =", "-1 =")
    default = option.default if node_default is None else node_default
    if option.kind == "choice":  # a node may offer fewer entries (e.g. no dit_mode "attn" in ComfyUI), in order
        table = [str(c) for c in option.choices]
        assert kind == [c for c in table if c in kind] and extra["default"] == str(default)
    elif option.kind == "bool":
        assert kind == "BOOLEAN" and extra["default"] is default
    elif option.kind == "seed":
        assert (kind, extra["default"], extra["min"], extra["max"]) == ("INT", NODE_SEED_DEFAULT, 0, INT_MAX)
        assert extra["control_after_generate"] is False  # the frontend would otherwise randomise it
    elif option.kind == "int" and default is None and option.name != "min_tokens":  # None shown as -1
        assert (kind, extra["default"], extra["min"], extra["max"]) == ("INT", -1, -1, option.hi)
    elif option.kind == "int":
        hi = INT_MAX if option.hi is None else option.hi
        assert (kind, extra["default"], extra["min"], extra["max"]) == ("INT", default, option.lo, hi)
    else:
        hi = option.hi - option.step if option.hi_open else option.hi
        assert kind == "FLOAT" and (extra["default"], extra["min"]) == (default, option.lo)
        assert extra["max"] == pytest.approx(hi) and extra["step"] == option.step


@pytest.mark.parametrize("node, table", [
    (TomesdExtTokenMergingSimple, TOME_OPTIONS), (TomesdExtTokenMerging, TOME_OPTIONS),
    (TomesdExtImportanceMerging, TOME_OPTIONS), (TomesdExtVidToMe, VIDTOME_OPTIONS),
])
def test_node_widgets_are_the_table(node, table):
    required = node.INPUT_TYPES()["required"]
    widgets = [n for n in required if n not in ("model", "start_percent", "end_percent")]
    assert widgets and set(widgets) <= set(table)
    for name in widgets:
        node_default = {"min_tokens": MIN_TOKENS_DEFAULT, "max_error": 0.0}.get(name)  # max_error 0 = off
        _check_widget(table[name], required[name], node_default)


def test_readme_and_video_doc_tables_are_current():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "option_tables.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert "<!-- options:tome -->" in readme
    assert "<!-- options:vidtome -->" in open(os.path.join(REPO, "docs", "video.md"), encoding="utf-8").read()
