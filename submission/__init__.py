"""Kaggle DSB2018 submission tools: RLE, instance splitting, the competition metric, CSV I/O.

Pure NumPy/SciPy/scikit-image: no Ray or TensorFlow import.
"""
