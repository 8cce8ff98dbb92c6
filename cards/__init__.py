"""The cards stage (see README)."""
