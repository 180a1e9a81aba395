"""Training and choosing settings: the Ray Train loop and its Keras callbacks, the tune step on the tune split,
and evaluation on held-out splits.

Imports from the project: every stage below it (config, io, labels, outputs, data, model, segment).
"""
