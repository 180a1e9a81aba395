"""Synthetic nuclei images in Kaggle's DSB2018 layout: the embedded default dataset.

Seeded and deterministic: sample `index` of seed `seed` is always the same image. Three looks like the
real data (fluorescence, bright-field, stained tissue), touching nuclei, uneven illumination, blur and
noise; masks never overlap. Run `python -m pipeline.io.synthetic OUT --count N` to write a dataset.
"""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

from pipeline.io.images import encode_png
from pipeline.io.samples import Sample, SampleRef

SIZES = ((256, 256), (256, 320), (360, 360), (520, 696))
LOOKS = ("fluorescence", "fluorescence", "fluorescence", "brightfield", "stained")


def sample_id(seed: int, index: int) -> str:
    return f"synthetic-{seed}-{index:05d}"


def synthetic_refs(count: int, seed: int = 0) -> list[SampleRef]:
    """Refs for `count` synthetic samples; they render wherever they are loaded (no files needed)."""
    return [SampleRef(image_id=sample_id(seed, i), kind="synthetic", source=str(seed), index=i, has_masks=True)
            for i in range(count)]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def _draw_nuclei(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Instance labels of randomly placed elliptical nuclei; some touch, none overlap."""
    labels = np.zeros((height, width), np.int32)
    scale = rng.uniform(0.7, 1.4)
    count = int(rng.integers(8, 30) * (height * width / 65536) ** 0.6)
    centres: list[tuple[float, float, float]] = []
    label = 0
    scratch = np.zeros_like(labels, dtype=np.uint8)
    for _ in range(count):
        radius = rng.uniform(5, 14) * scale
        if centres and rng.random() < 0.35:  # a neighbour touching the previous nucleus
            cy, cx, cr = centres[-1]
            angle = rng.uniform(0, 2 * np.pi)
            distance = (cr + radius) * rng.uniform(0.8, 0.95)
            y, x = cy + distance * np.sin(angle), cx + distance * np.cos(angle)
        else:
            y, x = rng.uniform(0, height), rng.uniform(0, width)
        axes = (max(2, int(radius * rng.uniform(0.7, 1.3))), max(2, int(radius * rng.uniform(0.7, 1.3))))
        scratch[:] = 0
        cv2.ellipse(scratch, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        free = (scratch > 0) & (labels == 0)
        if free.sum() < 20:
            continue
        label += 1
        labels[free] = label
        centres.append((y, x, radius))
    return labels


def render_sample(seed: int, index: int, with_masks: bool = True) -> Sample:
    """Render synthetic sample `index` of `seed` at its original resolution."""
    rng = np.random.default_rng([seed, index])
    height, width = SIZES[int(rng.integers(len(SIZES)))]
    look = LOOKS[int(rng.integers(len(LOOKS)))]
    labels = _draw_nuclei(rng, height, width)
    nuclei = int(labels.max())
    brightness = np.concatenate([[0.0], rng.uniform(0.45, 1.0, nuclei)]).astype(np.float32)
    texture = 1.0 + 0.15 * _smooth_noise(rng, (height, width), 2.0)
    signal = cv2.GaussianBlur(brightness[labels] * texture, (0, 0), rng.uniform(0.6, 1.4))
    illumination = 1.0 + 0.12 * _smooth_noise(rng, (height, width), max(height, width) / 4)
    if look == "fluorescence":
        background = rng.uniform(0.0, 0.08)
        grey = background + signal * rng.uniform(0.5, 1.0) * illumination
        tint = np.array([1.0, 1.0, 1.0]) if rng.random() < 0.7 else rng.uniform(0.3, 1.0, 3)
        rgb = grey[..., None] * tint[None, None, :]
    elif look == "brightfield":
        background = rng.uniform(0.65, 0.85) * illumination
        grey = background - 0.45 * signal
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:  # stained tissue: purple nuclei on pink, textured
        pink = np.array([0.92, 0.70, 0.82]) * rng.uniform(0.9, 1.05)
        purple = np.array([0.42, 0.25, 0.58]) * rng.uniform(0.8, 1.1)
        tissue = 1.0 + 0.06 * _smooth_noise(rng, (height, width), 6.0)
        weight = np.clip(signal, 0, 1)[..., None]
        rgb = (pink * (1 - weight) + purple * weight) * (tissue * illumination)[..., None]
    rgb = rgb + rng.normal(0, rng.uniform(0.005, 0.03), rgb.shape)
    image = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if not with_masks:
        return Sample(sample_id(seed, index), image, None, None, 0)
    return Sample(sample_id(seed, index), image, (labels > 0).astype(np.uint8), labels, nuclei)


def write_dataset(output: str, count: int, seed: int = 0, with_masks: bool = True) -> list[str]:
    """Write `count` samples in Kaggle's layout under `output`; returns the image ids."""
    ids = []
    for index in range(count):
        sample = render_sample(seed, index)
        folder = os.path.join(output, sample.image_id)
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)
        with open(os.path.join(folder, "images", sample.image_id + ".png"), "wb") as stream:
            stream.write(encode_png(sample.image))
        if with_masks:
            os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
            for label in range(1, sample.nuclei + 1):
                mask = ((sample.labels == label) * 255).astype(np.uint8)
                with open(os.path.join(folder, "masks", f"{sample.image_id}-m{label:03d}.png"), "wb") as stream:
                    stream.write(encode_png(mask))
        ids.append(sample.image_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.io.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="folder to write <id>/images/<id>.png and <id>/masks/*.png into")
    parser.add_argument("--count", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--no-masks", action="store_true", help="write images only (a test set)")
    args = parser.parse_args(argv)
    ids = write_dataset(args.output, args.count, args.seed, with_masks=not args.no_masks)
    print(f"wrote {len(ids)} synthetic images to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
