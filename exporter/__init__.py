"""The exporter stage (see README)."""
