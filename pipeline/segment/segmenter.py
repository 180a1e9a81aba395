"""One model with its stored settings in this process (no Ray): an image in, its nuclei's labels out.
The same reading, prediction and post-processing as jobs/segment.py, one image at a time."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from pipeline.config import SegmentConfig
from pipeline.data.augment import apply_appearance
from pipeline.data.protocol import image_kind
from pipeline.io.images import AS_IS, image_from_array, normalise, resize_image
from pipeline.model.registry import resolve_model
from pipeline.segment.postprocess import labels_at_zoom, needs_image_kind, postprocess_settings, prediction_settings
from pipeline.segment.predictor import Predictor, load_forward


class Segmenter:
    """One model with its stored settings, in this process (no Ray): an image in, its nuclei's labels out."""

    def __init__(self, model_path: str, config: SegmentConfig, threads: int = 2):
        self.model_path = model_path
        self.info = load_forward(model_path, threads)[0]  # its run.json (RunInfo); the Predictor reuses the load
        self.post = postprocess_settings(config, self.info)
        self.predictor = Predictor(model_path, batch_size=1, threads=threads, **prediction_settings(config, self.info),
                                   tile=config.tile or self.info.effective_tile, overlap=config.overlap)
        self.needs_kind = needs_image_kind(self.post, model_path, self.info)

    @classmethod
    def load(cls, model: str = "dsb2018", threads: int = 2, **settings) -> "Segmenter":
        """A shipped model by name, or a model.keras / model.onnx path; `settings` are SegmentConfig fields that
        override the stored ones (threshold, seed_threshold, min_size, tta, scales, nucleus_area, instance_filter,
        split_clumps, refine_outlines, tile, overlap)."""
        config = dataclasses.replace(SegmentConfig(model=model), **settings)
        return cls(os.path.abspath(resolve_model(model)), config, threads)

    def segment(self, image: np.ndarray, kind: str | None = None, appearance: dict | None = None,
                channel: str | int = "", axes: str = "", names: list[str] | None = None) -> np.ndarray:
        """Nucleus labels (int32, the image's own height and width; 0 background, 1..N nuclei) of an RGB, RGBA or
        grey image of any integer or float type, or a channel stack (`axes` in tifffile's letters, e.g. 'CYX';
        guessed when not given; `names`: its channels' names): `channel` names or numbers its nuclear channel, as
        --nuclear-channel does, else the channel named as a nuclear stain, else channel 0.

        For a block of a larger image, `kind` (pipeline.data.protocol.image_kind) and `appearance`
        (pipeline.data.augment.fit_appearance) measured on the whole image make every block segmented alike."""
        # RGB(A) order, as PIL gives; a block of a larger image (`appearance` given) was read by its whole image's rules
        image = np.asarray(image)
        block = appearance is not None and image.dtype == np.uint8  # a dim block is not stretched again on its own
        rgb = image_from_array(image, axes, names, str(channel), levels=AS_IS if block else None,
                               colours="keep" if appearance is not None else "auto").image
        return self.labels(rgb, kind, appearance)

    def labels(self, rgb: np.ndarray, kind: str | None = None, appearance: dict | None = None) -> np.ndarray:
        """Nucleus labels of an image already read (RGB uint8, pipeline.io.images' reading): the model's look,
        prediction (its kind's specialist) and post-processing, the size measurement's nuclei reused."""
        if kind is None:
            kind = image_kind(rgb) if self.needs_kind else ""
        prepared = apply_appearance(rgb, self.info.appearance, appearance)
        zoom = 1.0
        if self.info.mode == "native":
            probabilities, zoom, measured = self.predictor.predict_whole(normalise(prepared), kind, keep_zoom=True)
        else:
            size = self.info.image_size or 128
            probabilities, measured = self.predictor.predict(normalise(resize_image(prepared, size))[None])[0], None
        return labels_at_zoom(probabilities, rgb.shape[0], rgb.shape[1], zoom, rgb, self.post.for_kind(kind),
                              measured).astype(np.int32)
