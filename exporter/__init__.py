"""The export stage: one validated ONNX graph (encoder + text heads) and a torch-free predictor.

>>> from clipship.exporter.onnx_export import export          # doctest: +SKIP
>>> export("merged/", "heads/", "export/", precisions=["fp32", "int8"])  # doctest: +SKIP
"""
