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



def _import_quietly():
    """Import TensorFlow and tf-keras with stderr closed: their C++ start-up lines (absl, oneDNN, CUDA probing)
    are written before any Python logging setting can stop them. NUCLEI_VERBOSE=1 shows them."""
    if os.environ.get("NUCLEI_VERBOSE") == "1":
        import tensorflow
        import tf_keras
        return tensorflow, tf_keras
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow
        import tf_keras
        tensorflow.config.list_physical_devices()  # the CUDA probe's lines come here, not at import
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow, tf_keras


tf, keras = _import_quietly()

tf.get_logger().setLevel("ERROR")

__all__ = ["tf", "keras"]
