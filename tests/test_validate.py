"""The submission validator catches each rule violation; the scorer reads CSVs back."""
import numpy as np
import pytest

from submission.csvfile import rows_for_image, write_submission
from submission.score import score_submission
from submission.validate import main as validate_main, violations

SHAPES = {"a": (4, 4), "b": (3, 3)}


def write(tmp_path, text):
    path = tmp_path / "sub.csv"
    path.write_text(text)
    return str(path)


def test_valid_submission_passes(tmp_path):
    labels = np.zeros((4, 4), np.int32)
    labels[0:2, 0] = 1
    labels[3, 3] = 2
    path = str(tmp_path / "ok.csv")
    write_submission(path, {"a": rows_for_image("a", labels), "b": rows_for_image("b", np.zeros((3, 3)))})
    assert violations(path, SHAPES) == []
    assert open(path).read() == "ImageId,EncodedPixels\na,1 2\na,16 1\nb,\n"


@pytest.mark.parametrize("text, fragment", [
    ("Id,Pixels\na,1 1\nb,\n", "header is"),
    ("ImageId,EncodedPixels\na,1 1\n", "image 'b' has no row"),
    ("ImageId,EncodedPixels\na,1 1\nb,\nzzz,1 1\n", "unknown image id 'zzz'"),
    ("ImageId,EncodedPixels\na,5 1 1 1\nb,\n", "not sorted"),
    ("ImageId,EncodedPixels\na,15 3\nb,\n", "outside"),
    ("ImageId,EncodedPixels\na,1 2\na,2 1\nb,\n", "overlaps"),
    ("ImageId,EncodedPixels\na,1 x\nb,\n", "not an integer"),
    ("ImageId,EncodedPixels\na,1 2 3\nb,\n", "odd number"),
])
def test_each_violation_is_reported(tmp_path, text, fragment):
    problems = violations(write(tmp_path, text), SHAPES)
    assert any(fragment in problem for problem in problems), problems


def test_validator_cli_exit_status(tmp_path, synthetic_folder, capsys):
    path = write(tmp_path, "ImageId,EncodedPixels\n")
    assert validate_main([path, "--images", synthetic_folder]) == 1
    assert "has no row" in capsys.readouterr().out


def test_scorer_reads_a_submission_back(tmp_path):
    truth = np.zeros((10, 10), np.int32)
    truth[1:4, 1:4], truth[6:9, 6:9] = 1, 2
    path = str(tmp_path / "s.csv")
    write_submission(path, {"x": rows_for_image("x", truth * (truth == 1))})
    report = score_submission(path, {"x": truth})
    assert report.score == pytest.approx(0.5) and report.score_at_50 == pytest.approx(0.5)
