"""Write the option tables of README.md and docs/video.md from the core's option tables.

    python scripts/option_tables.py          # rewrite the blocks between the markers
    python scripts/option_tables.py --check  # exit 1 when a block differs (tests do this too)

A block sits between `<!-- options:NAME -->` and `<!-- /options -->`; NAME is tome, vidtome or
todo (tomesd_ext.core.TOME_OPTIONS, VIDTOME_OPTIONS, TODO_OPTIONS).
"""

from __future__ import annotations

import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tomesd_ext.core import TODO_OPTIONS, TOME_OPTIONS, VIDTOME_OPTIONS  # noqa: E402

TABLES = {"tome": TOME_OPTIONS, "vidtome": VIDTOME_OPTIONS, "todo": TODO_OPTIONS}
FILES = ("README.md", "docs/video.md")
BLOCK = re.compile(r"(<!-- options:(\w+) -->\n)(.*?)(<!-- /options -->)", re.S)


def markdown_table(table: dict) -> str:
    """The README table of an option table: | option | default | allowed | meaning |; the
    options a simple front end shows (Option.simple) in bold, with a line saying so."""

    def show(value):
        return f'`"{value}"`' if isinstance(value, str) else str(value)

    rows = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    for o in table.values():
        help_text = o.help.replace("|", "\\|")
        name = f"**`{o.name}`**" if o.simple else f"`{o.name}`"
        rows.append(f"| {name} | {show(o.default)} | {o.allowed} | {help_text} |")
    if any(o.simple for o in table.values()):
        rows += ["", "In bold: the options of the simple ComfyUI node **Token Merging (ToMe)** (with the sampling "
                 "window); it runs every other one at its default (seed 0 instead of a drawn one). **Token Merging (ToMe, Advanced)** shows "
                 "all that apply in ComfyUI ([docs/comfyui.md](docs/comfyui.md))."]
    return "\n".join(rows)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + markdown_table(TABLES[m.group(2)]) + "\n" + m.group(4), text)


def main(argv) -> int:
    stale = []
    for name in FILES:
        path = os.path.join(REPO, name)
        text = open(path, encoding="utf-8").read()
        new = render(text)
        if new != text:
            stale.append(name)
            if "--check" not in argv:
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(new)
                os.replace(tmp, path)
    if "--check" in argv and stale:
        print("option tables out of date: " + ", ".join(stale) + " (run scripts/option_tables.py)")
        return 1
    print(("updated: " + ", ".join(stale)) if stale else "option tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
