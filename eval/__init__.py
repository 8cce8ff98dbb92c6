"""The eval stage (see README)."""
