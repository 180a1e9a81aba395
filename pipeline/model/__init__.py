"""The network and its files: the U-Net, the tf-keras shim, model.keras / ONNX loading, shipped models by name
with their sha256, and run.json (RunInfo).

Imports from the project: pipeline.config, pipeline.io, pipeline.labels, pipeline.data.
"""
