"""Check a submission CSV against its test images: `python -m submission.validate SUB.csv --images DIR`.

Header, every image present and no unknown ones, runs well formed, sorted and inside the image, no
pixel claimed by two nuclei. One line per violation; exit status 1 when there is any.
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping

import numpy as np

from submission import rle
from submission.csvfile import HEADER, read_submission

from pipeline.io.images import decode_image, image_dimensions
from pipeline.io.sources import list_images, read_file


def image_shapes(images: str) -> dict[str, tuple[int, int]]:
    """(height, width) of every image under a test folder or zip, keyed by image id (headers only)."""
    shapes = {}
    for ref in list_images(images).refs:
        try:
            data = read_file(ref, ref.image_path)
            dims = image_dimensions(data) or decode_image(data).shape[:2]
        except Exception:  # noqa: BLE001 - an unreadable test image still has an id; size unknown
            dims = (0, 0)
        shapes[ref.image_id] = (int(dims[0]), int(dims[1]))
    return shapes


def violations(path: str, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Every rule the submission breaks, one human-readable line each (empty when valid)."""
    problems: list[str] = []
    header, rows = read_submission(path)
    if tuple(header) != HEADER:
        problems.append(f"header is {','.join(header)!r}, expected {','.join(HEADER)!r}")
    seen: set[str] = set()
    claimed: dict[str, np.ndarray] = {}
    for line, image_id, encoded in rows:
        seen.add(image_id)
        if image_id not in shapes:
            problems.append(f"line {line}: unknown image id {image_id!r}")
            continue
        try:
            starts, lengths = rle.parse(encoded)
        except ValueError as error:
            problems.append(f"line {line}: {image_id}: {error}")
            continue
        if not starts.size:
            continue
        height, width = shapes[image_id]
        if lengths.min() < 1:
            problems.append(f"line {line}: {image_id}: a run has length < 1")
            continue
        if np.any(np.diff(starts) <= 0) or np.any(starts[1:] < starts[:-1] + lengths[:-1]):
            problems.append(f"line {line}: {image_id}: runs are not sorted ascending and disjoint")
            continue
        if height * width and (starts.min() < 1 or (starts + lengths - 1).max() > height * width):
            problems.append(f"line {line}: {image_id}: a run lies outside the {width}x{height} image")
            continue
        if not height * width:
            continue
        counts = claimed.setdefault(image_id, np.zeros(height * width, np.uint16))
        mask = rle.decode(encoded, height, width).ravel(order="F")
        if np.any(counts[mask] > 0):
            problems.append(f"line {line}: {image_id}: overlaps another nucleus of the same image")
        counts[mask] += 1
    for image_id in sorted(set(shapes) - seen):
        problems.append(f"image {image_id!r} has no row (an image without nuclei needs one empty row)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m submission.validate", description=__doc__.splitlines()[0])
    parser.add_argument("submission", help="the submission CSV")
    parser.add_argument("--images", required=True, help="test images: Kaggle layout or any image tree (folder or zip)")
    args = parser.parse_args(argv)
    try:
        shapes = image_shapes(args.images)
        problems = violations(args.submission, shapes)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"{'INVALID' if problems else 'valid'}: {len(problems)} problem(s), {len(shapes)} image(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
