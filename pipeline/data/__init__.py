"""Data for training and tuning: Ray Data datasets, augmentation and appearance, the protocol (splits and image
kinds), shifted variants of images.

Imports from the project: pipeline.config, pipeline.io, pipeline.labels.
"""
