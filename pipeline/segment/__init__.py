"""Segmenting images: the predictor (forward passes, size normalisation), post-processing settings, the in-process
Segmenter, large images block by block, and the Ray Data run behind jobs/segment.py.

Imports from the project: every stage below it (config, io, labels, outputs, data, model); never pipeline.train.
"""
