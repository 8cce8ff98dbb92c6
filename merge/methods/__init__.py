"""One merge method per file; each defines ``METHOD`` and is found by ``registry.methods()``."""
