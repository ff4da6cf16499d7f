"""Sub-commands of the `tomesd-ext` CLI (front end: may import adapters and core)."""
