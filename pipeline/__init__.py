"""Nuclei segmentation library, in stages that import one way, from the top down (docs/layout.md):

api, cli  ->  train  ->  segment  ->  model  ->  data  ->  outputs  ->  io, labels  ->  config

Importing the package is cheap: TensorFlow, ONNX Runtime and Ray are imported only by the modules that need them.
"""
