"""tomesd-ext: fast, faithful token merging for image and video diffusion.

The diffusers entry points are imported lazily so that ``import tomesd_ext.core`` works
without diffusers installed (ComfyUI ships its own model code).
"""

__version__ = "0.1.0"

__all__ = ["apply_todo", "apply_tome", "apply_vidtome", "remove_todo", "remove_tome", "remove_vidtome", "__version__"]


def __getattr__(name):
    if name in ("apply_tome", "remove_tome", "apply_todo", "remove_todo", "apply_vidtome", "remove_vidtome"):
        from . import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module 'tomesd_ext' has no attribute {name!r}")
