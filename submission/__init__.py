"""Kaggle's side of DSB2018: run-length encoding, the submission CSV, `validate` and `score` (the metric itself,
pipeline.labels.metric, is shared with evaluation and tuning).

This package imports `pipeline`; nothing in `pipeline` imports it. Pure NumPy: no Ray or TensorFlow import.
"""
