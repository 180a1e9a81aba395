"""Files in: where images live (folders, zips, URIs), decoding any bit depth and channel layout, pixel sizes,
windows of large images, label files, and the embedded synthetic generator.

Imports from the project: pipeline.config only. No Ray, no TensorFlow.
"""
