"""The CLIP runtime, below every stage: tasks (class names, templates, data sources), image data
with the processor-exact preprocessing, text heads, and the zero-shot model."""
