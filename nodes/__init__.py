"""ComfyUI nodes of tomesd-ext (none exported yet: the ComfyUI node pack is a separate issue)."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
