"""The single import point for TensorFlow and Keras in this project.

We use tf-keras (the Keras 2 API) everywhere, not Keras 3: with TF 2.21, Keras 3.15 and Ray 2.60,
Keras 3's `model.fit` under MultiWorkerMirroredStrategy fails ("Attempt to convert a value
(PerReplica:{...})"), while tf-keras trains, all-reduces and checkpoints correctly. Using one Keras for
training, saving and inference means one `model.keras` file serves every job.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # must precede the first TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras"]
