"""A Kaggle submission in one call: segment a folder of test images, write the CSV, validate it, score it.

    from submission.api import submit

    result = submit("stage1_test/", "submission.csv")               # the shipped model, its stored settings
    result = submit("stage1_test/", "sub.csv", labels="stage1_test_with_masks.zip")   # and the local score
    print(result.rows, result.score.score if result.score else None)

`jobs/submit.py` (`nuclei-submit`) is this function behind the command line's flags.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pipeline.config import SegmentConfig
from pipeline.segment.run import run_segmentation
from submission.csvfile import write_submission
from submission.rle import encode_labels
from submission.score import load_truth, score_submission
from submission.validate import image_shapes, violations

__all__ = ["Submission", "submit", "make_submission"]


@dataclass
class Submission:
    """What a submission run wrote: the CSV, its rows, images (and how many could not be read: empty predictions),
    the segmentation's working folder (labels, manifest; a rerun resumes from it) and the score with labels."""

    path: str
    rows: int
    images: int
    failed: int
    work_dir: str
    score: object | None = None  # submission.score.ScoreReport (its .score is the mean)


def make_submission(config: SegmentConfig) -> Submission:
    """Segment config.input (as jobs/segment.py, into `<output stem>_work/`), write `ImageId,EncodedPixels` with
    every listed image present, validate it against the images' sizes, and score it when config.labels is set.
    Raises ValueError with the first problem when the CSV fails validation."""
    output = config.output or "submission.csv"
    work_dir = os.path.splitext(output)[0] + "_work"
    result = run_segmentation(dataclasses.replace(config, output=output), work_dir, encoder=encode_labels)
    rows = {}
    for row in result.rows:
        if row["image_id"]:  # every listed test image gets rows; an unreadable one an empty prediction
            rows[row["image_id"]] = [(row["image_id"], rle) for rle in result.rles.get(row["image_id"], [])] \
                or [(row["image_id"], "")]
    count = write_submission(output, rows)
    problems = violations(output, image_shapes(config.input))
    if problems:
        raise ValueError(f"{output} failed validation: {problems[0]} ({len(problems)} problems)")
    score = score_submission(output, load_truth(config.labels)) if config.labels else None
    return Submission(output, count, len(rows), result.failed, work_dir, score)


def submit(input: str, output: str = "submission.csv", model: str = "dsb2018", labels: str = "",
           **settings) -> Submission:
    """make_submission with keyword arguments: `settings` are SegmentConfig fields (threshold=0.6, tta=True, ...)."""
    config = dataclasses.replace(SegmentConfig(model=model, input=input, output=output, labels=labels), **settings)
    return make_submission(config)
