"""Nuclei segmentation library: readers, Ray Data pipeline, U-Net model, training and inference.

Importing the package is cheap: TensorFlow and Ray are imported only by the modules that need them.
"""
