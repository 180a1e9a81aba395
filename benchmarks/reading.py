"""What reading files as labs write them costs an in-range 8-bit image: the 600 real PNGs decoded and classified
by kind, the earlier reader (OpenCV decode, BGR to RGB, colourfulness alone) against pipeline.io.images.read_image with
pipeline.data.protocol.image_kind (channel checks, one-colour test, dim-stain test, dim 8-bit images stretched), side
by side in interleaved turns, for the in-range images and the dim ones (99.9th percentile under 128) apart.
Also the rate of BBBC039's raw 16-bit TIFFs. Last line: `ratio=<new/old time>` of the in-range images.
"""
from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from common import ROOT, interleaved_medians, require_real_zip

BBBC039 = os.path.join(ROOT, "..", "shared", "data", "bbbc039", "bbbc039.zip")


def earlier_reader(data: bytes) -> str:
    """The reader before 2026-12-06 for an 8-bit PNG: header check, decode, to RGB, the kind from colourfulness and
    the median."""
    from pipeline.io.images import image_dimensions
    from pipeline.data.protocol import STAINED_COLOURFULNESS, _distance_from_grey, _sampled_pixels

    image_dimensions(data)  # the pixel-limit check before decoding, as then
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    pixels = _sampled_pixels(image)
    if _distance_from_grey(pixels) > STAINED_COLOURFULNESS:
        return "stained"
    return "bright-field" if float(np.median(pixels)) > 127 else "fluorescence"


def current_reader(data: bytes) -> str:
    from pipeline.io.images import read_image
    from pipeline.data.protocol import image_kind

    return image_kind(read_image(data).image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5, help="interleaved turns of each reader")
    args = parser.parse_args()
    from pipeline.io.images import read_image
    from pipeline.io.sources import list_kaggle, read_file

    refs = list_kaggle(require_real_zip()).refs
    files = [read_file(ref, ref.image_path) for ref in refs]
    assert [earlier_reader(data) for data in files] == [current_reader(data) for data in files], "kinds changed"
    dim = [data for data in files if read_image(data).intensity.startswith("dim")]
    in_range = [data for data in files if not read_image(data).intensity.startswith("dim")]
    groups = {"in-range": in_range, "dim": dim}
    medians = interleaved_medians({(group, reader.__name__): (lambda r=reader, g=chosen: [r(data) for data in g])
                                   for group, chosen in groups.items() for reader in (earlier_reader, current_reader)},
                                  repeats=args.turns)
    ms = {key: 1000 * seconds / len(groups[key[0]]) for key, seconds in medians.items()}
    print(f"{len(files)} 8-bit PNGs, decode + kind, medians of {args.turns} interleaved turns (every kind the same):")
    for group, chosen in groups.items():
        earlier, current = ms[(group, "earlier_reader")], ms[(group, "current_reader")]
        print(f"  {len(chosen)} {group}: earlier reader {earlier:.2f} ms per image, current {current:.2f} ms "
              f"(x{current / earlier:.2f})")
    if os.path.isfile(BBBC039):
        raw = [read_file(ref, ref.image_path) for ref in list_kaggle(BBBC039).refs]
        started = time.perf_counter()
        for data in raw:
            current_reader(data)
        print(f"{len(raw)} BBBC039 16-bit TIFFs: {1000 * (time.perf_counter() - started) / len(raw):.2f} ms per image")
    print(f"ratio={ms[('in-range', 'current_reader')] / ms[('in-range', 'earlier_reader')]:.2f}")


if __name__ == "__main__":
    main()
