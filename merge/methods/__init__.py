"""One merge method per file; each defines ``METHOD``, found by ``registry.method_table()``."""
