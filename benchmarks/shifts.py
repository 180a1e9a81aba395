"""The shift table: a model's score on the test split as labs' files show it, beside the plain test split.

Each shift of pipeline.data.shifts (16-bit on a camera offset, dim, one colour channel, a 2-channel OME-TIFF stack,
rescaled x0.5 and x2, stain-shifted H&E) is written as files, segmented by jobs/segment.py's pipeline with the model's
stored settings and no flag, and scored with the competition's metric against the true nuclei; then BBBC039's raw
16-bit TIFFs and TNBC's H&E images (`../shared/data/`), as they are. Prints a Markdown table (all images and per kind,
and each shifted row's difference from the plain one) and writes it to --output.

    python benchmarks/shifts.py --model dsb2018 --output runs/shifts.md
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from common import REAL_ZIP, ROOT, require_real_zip

EXTRA_SETS = {"BBBC039, raw 16-bit TIFF": os.path.join(ROOT, "..", "shared", "data", "bbbc039", "bbbc039.zip"),
              "TNBC, H&E": os.path.join(ROOT, "..", "shared", "data", "tnbc", "tnbc.zip")}


def write_set(folder: str, items: list[tuple[str, str, bytes]]) -> None:
    """Files in Kaggle's test layout: (image id, suffix, bytes) each."""
    for image_id, suffix, data in items:
        path = os.path.join(folder, image_id, "images", image_id + suffix)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(data)


def score_set(model: str, items: list[tuple[str, str, bytes]], truths: dict, kinds: dict, work: str) -> dict:
    """Segment the files as jobs/segment.py does (stored settings, no flag) and score each: {image id: score}."""
    from pipeline.config import SegmentConfig
    from pipeline.outputs.folder import find_labels, read_labels
    from pipeline.segment.run import run_segmentation
    from pipeline.labels.metric import image_score

    folder, output = tempfile.mkdtemp(dir=work), tempfile.mkdtemp(dir=work)
    write_set(folder, items)
    result = run_segmentation(SegmentConfig(model=model, input=folder, output=output, measurements=False,
                                            report=False, redo=True), output)
    failed = [row for row in result.rows if row["status"] != "done"]
    if failed:
        print(f"  {len(failed)} files not segmented, e.g. {failed[0]['path']}: {failed[0]['error']}")
    scores = {}
    for image_id, suffix, _ in items:
        location = find_labels(output, f"{image_id}/images/{image_id}{suffix}")
        predicted = read_labels(location) if location else np.zeros_like(truths[image_id])
        scores[image_id] = image_score(truths[image_id], predicted.astype(np.int32))
    return {"scores": scores, "kinds": kinds, "seconds": result.seconds}


def row_of(name: str, result: dict, plain: dict | None) -> str:
    from pipeline.data.protocol import KINDS

    scores, kinds = result["scores"], result["kinds"]
    cells = [f"{np.mean(list(scores.values())):.3f}"]
    for kind in KINDS:
        chosen = [score for image_id, score in scores.items() if kinds[image_id] == kind]
        cells.append(f"{np.mean(chosen):.3f}" if chosen else "")
    difference = ""
    if plain is not None:
        difference = f"{np.mean(list(scores.values())) - np.mean(list(plain['scores'].values())):+.3f}"
    return f"| {name} | {len(scores)} | " + " | ".join(cells) + f" | {difference} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dsb2018", help="a shipped model's name or a model.keras / .onnx path")
    parser.add_argument("--split", default="test", choices=("test", "tune"), help="the evaluation protocol's split")
    parser.add_argument("--limit", type=int, default=0, help="score only this many images of each set (0: all)")
    parser.add_argument("--shifts", default="", help="comma-separated shift names (default: all; 'none': none)")
    parser.add_argument("--output", default="", help="also write the table to this Markdown file")
    args = parser.parse_args()

    from pipeline.data.datasets import protocol_refs
    from pipeline.data.protocol import image_kind
    from pipeline.data.shifts import SHIFTS
    from pipeline.io.sources import list_kaggle, load_sample, read_file

    refs = protocol_refs(list_kaggle(require_real_zip()).refs)[args.split]
    refs = refs[:args.limit] if args.limit else refs
    samples = {ref.image_id: load_sample(ref) for ref in refs}
    kinds = {image_id: image_kind(sample.image) for image_id, sample in samples.items()}
    names = [] if args.shifts in ("", "none") else [name.strip() for name in args.shifts.split(",")]
    unknown = [name for name in names if name not in SHIFTS]
    if unknown:
        parser.error(f"--shifts: no shift named {', '.join(map(repr, unknown))}; the names: {', '.join(SHIFTS)}")
    chosen = SHIFTS if not args.shifts else {name: SHIFTS[name] for name in names}
    lines = [f"| images ({args.split} split of {os.path.basename(REAL_ZIP)} unless named) | n | all | fluorescence | "
             "stained | bright-field | vs plain |", "|---|---:|---:|---:|---:|---:|---:|"]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="shifts-") as work:
        truths = {image_id: sample.labels for image_id, sample in samples.items()}
        plain = score_set(args.model, [(ref.image_id, os.path.splitext(ref.image_path)[1], read_file(ref, ref.image_path))
                                       for ref in refs], truths, kinds, work)
        lines.append(row_of("plain (8-bit PNG, as in the archive)", plain, None))
        print(lines[-1], flush=True)
        for name, shift in chosen.items():
            items, shifted_truths = [], {}
            for image_id, sample in samples.items():
                suffix, data, labels = shift(sample.image, sample.labels)
                items.append((image_id, suffix, data))
                shifted_truths[image_id] = labels
            lines.append(row_of(name, score_set(args.model, items, shifted_truths, kinds, work), plain))
            print(lines[-1], flush=True)
        for name, location in EXTRA_SETS.items():
            if not os.path.isfile(location):
                print(f"skipped {name}: {os.path.normpath(location)} not found")
                continue
            extra = [ref for ref in list_kaggle(location).refs if ref.has_masks]  # as submission/score.py scores
            extra = extra[:args.limit] if args.limit else extra
            items = [(ref.image_id, os.path.splitext(ref.image_path)[1], read_file(ref, ref.image_path))
                     for ref in extra]
            truths = {ref.image_id: load_sample(ref).labels for ref in extra}
            extra_kinds = {ref.image_id: image_kind(load_sample(ref, with_masks=False).image) for ref in extra}
            lines.append(row_of(name, score_set(args.model, items, truths, extra_kinds, work), None))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(f"\n{table}\n\n{time.time() - started:.0f} s")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as stream:
            stream.write(table + "\n")


if __name__ == "__main__":
    main()
