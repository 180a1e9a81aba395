"""bioimage.io model package (format 0.5) of a trained model: what deepImageJ, ilastik, QuPath and napari load.

The package holds the network (its ONNX export) with the normalisation it needs, written in the spec's terms (a
per-image percentile stretch, as the project's reading does), test tensors, a cover and a card. Its output is the
per-pixel class probabilities; the nuclei themselves come from the project's post-processing (seeds and
watershed), which the card describes and `Segmenter` runs. bioimageio.core is needed only here (the `bioimageio`
extra).
"""
from __future__ import annotations

import os
import tempfile
import time

import cv2
import numpy as np
import tifffile

from pipeline.data.protocol import image_kind
from pipeline.io.sources import load_sample
from pipeline.model.onnx import OnnxModel, check_images_for, check_refs, export_onnx
from pipeline.model.registry import read_model_info, resolve_model
from pipeline.model.runinfo import CLASS_NAMES, RunInfo

PERCENTILES = (1.0, 99.8)  # the stretch of the project's reading (pipeline.io.images) and StarDist's default
SIDE = 256  # the test image's side; any multiple of 32 from 64 up runs
CITATIONS = [
    ("Caicedo et al. 2019: Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. "
     "Nature Methods 16, 1247-1253 (the DSB2018 training images, CC0)", "10.1038/s41592-019-0612-7"),
    ("Naylor et al. 2019: Segmentation of nuclei in histopathology images by deep regression of the distance map. "
     "IEEE TMI 38(2) (the TNBC images, CC BY 4.0)", "10.1109/TMI.2018.2865709"),
    ("Ronneberger, Fischer, Brox 2015: U-Net: convolutional networks for biomedical image segmentation. MICCAI",
     "10.1007/978-3-319-24574-4_28"),
    ("Sandler et al. 2018: MobileNetV2: inverted residuals and linear bottlenecks. CVPR",
     "10.1109/CVPR.2018.00474"),
]


def stretched(image: np.ndarray) -> np.ndarray:
    """The package's preprocessing in numpy: float32, one 1st-99.8th percentile stretch over all pixels and channels
    (the spec's scale_range, linear quantiles, eps 1e-6), clipped to [0, 1]."""
    values = image.astype(np.float32)
    low, high = np.quantile(values, [p / 100 for p in PERCENTILES])
    return np.clip((values - low) / (high - low + 1e-6), 0.0, 1.0).astype(np.float32)


def test_image(source: str, count: int = 16) -> np.ndarray:
    """A fluorescence image (SIDE x SIDE x 3, as read) of the model's training data when present, else synthetic."""
    source, refs = check_refs(source, count)
    for ref in refs:
        image = load_sample(ref, with_masks=False).image
        if image_kind(image) == "fluorescence" and min(image.shape[:2]) >= SIDE:
            return np.ascontiguousarray(image[:SIDE, :SIDE])
    raise ValueError(f"no fluorescence image of at least {SIDE} x {SIDE} pixels among {len(refs)} of {source}")


def _card(info: RunInfo, name: str, classes: list[str]) -> str:
    """The package's documentation: what goes in, what comes out, how to get nuclei from it, how it was validated."""
    threshold, seed_threshold, min_size = info.postprocess.thresholds
    return f"""# {name}: nuclei in 2-D microscopy images (U-Net, MobileNetV2 encoder)

Per-pixel probabilities of {", ".join(classes)} for fluorescence, bright-field and H&E images, from the
nuclei-segmentation project (trained on the Kaggle 2018 Data Science Bowl stage-1 images, see its model card).

## Input
One image, batch x y x x x channel, y and x = 64 + 32 n pixels, 3 channels (a one-channel image repeated three
times), any bit depth: the package stretches each image from its 1st to its 99.8th percentile and clips to [0, 1]
(`scale_range`, `clip`). Nuclei must be bright on a dark background: invert bright-field and H&E images first
(the project's own reader does this, and routes H&E images to a stained-tissue specialist that this package does
not hold). The network was trained at the DSB2018 images' own resolution.

## Output
`probabilities`: softmax over {len(classes)} channels ({", ".join(classes)}), the input's y and x. The package
returns probabilities, not nuclei. The project turns them into nuclei: seeds where P(interior) >
{seed_threshold}, grown by watershed into P(interior) + P(border) > {threshold}, objects under {min_size} pixels dropped,
then the false-positive filter and outline refiner stored with the model (`models/dsb2018/run.json`).

## How to run it
- Python: `bioimageio.core` (`load_model_description`, `predict`), or the project itself for nuclei, measurements and
  exports: `python jobs/segment.py --input IMAGES --output OUT`.
- deepImageJ (Fiji): DeepImageJ Install Model with this zip, then DeepImageJ Run (ONNX weights need an ONNX engine in
  deepImageJ's engine folder).
- ilastik (1.4 and later): the Neural Network Classification workflow loads a bioimage.io model zip.
- QuPath: Extensions > Bioimage Model Zoo > Create pixel classifier, with QuPath's Deep Java Library extension; its
  default engines are PyTorch and TensorFlow, so the ONNX weights need an ONNX Runtime engine.
These three were not tried by the project; bioimageio.core's test_model, which ilastik's runner builds on, passes.

## Validation
The test tensors are a {SIDE} x {SIDE} fluorescence image and the probabilities the project computes for it with
ONNX Runtime; `bioimageio.core`'s `test_model` reproduces them. The project's score on its held-out DSB2018 test
split is in its model card (`models/dsb2018/README.md`).

## Licence and credit
MIT (the model). Trained on DSB2018 (CC0; Caicedo et al. 2019) and TNBC (CC BY 4.0; Naylor et al. 2019); the
encoder started from Keras' ImageNet MobileNetV2 weights (Apache-2.0).
"""


def _cover(image: np.ndarray, probabilities: np.ndarray, path: str) -> None:
    """A 2:1 cover: the stretched input beside its probabilities (interior green, border red)."""
    left = (stretched(image) * 255).astype(np.uint8)
    right = np.zeros_like(left)
    right[..., 1] = (probabilities[..., 1] * 255).astype(np.uint8)
    if probabilities.shape[-1] > 2:
        right[..., 0] = (probabilities[..., 2] * 255).astype(np.uint8)
    cv2.imwrite(path, np.concatenate([left, right], axis=1)[..., ::-1])


def _description(folder: str, onnx_file: str, info: RunInfo, name: str, classes: list[str]):
    from bioimageio.spec.model import v0_5 as spec

    space = spec.ParameterizedSize(min=64, step=32)
    image = spec.TensorId("image")
    file = lambda name: spec.FileDescr(source=os.path.join(folder, name))  # noqa: E731 - the package's files
    inputs = [spec.InputTensorDescr(
        id=image, description="the image, any bit depth; 3 channels (grey repeated for one-channel images)",
        axes=[spec.BatchAxis(), spec.SpaceInputAxis(id=spec.AxisId("y"), size=space),
              spec.SpaceInputAxis(id=spec.AxisId("x"), size=space), spec.ChannelAxis(channel_names=["R", "G", "B"])],
        test_tensor=file("test_input.npy"), sample_tensor=file("sample_input.png"),
        preprocessing=[
            spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
                axes=[spec.AxisId("y"), spec.AxisId("x"), spec.AxisId("channel")],
                min_percentile=PERCENTILES[0], max_percentile=PERCENTILES[1])),
            spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)),
            spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))])]  # last: the network's type
    size = lambda axis: spec.SizeReference(tensor_id=image, axis_id=spec.AxisId(axis))  # noqa: E731
    outputs = [spec.OutputTensorDescr(
        id=spec.TensorId("probabilities"), description=f"softmax probabilities: {', '.join(classes)}",
        axes=[spec.BatchAxis(), spec.SpaceOutputAxis(id=spec.AxisId("y"), size=size("y")),
              spec.SpaceOutputAxis(id=spec.AxisId("x"), size=size("x")), spec.ChannelAxis(channel_names=classes)],
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        test_tensor=file("test_output.npy"), sample_tensor=file("sample_output.tif"),
        postprocessing=[spec.SoftmaxDescr(kwargs=spec.SoftmaxKwargs(axis=spec.AxisId("channel")))])]
    return spec.ModelDescr(
        name=f"{name} nuclei U-Net MobileNetV2",
        description="Per-pixel nucleus probabilities (U-Net, MobileNetV2 encoder) for 2-D fluorescence, bright-field "
                    "and H&E images, trained on the 2018 Data Science Bowl images.",
        authors=[spec.Author(name="nuclei-segmentation contributors")],
        cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi)) for text, doi in CITATIONS],
        license=spec.LicenseId("MIT"), documentation=file("README.md"), covers=[file("cover.png")],
        tags=["nuclei", "instance-segmentation", "semantic-segmentation", "unet", "2d", "fluorescence-light-microscopy",
              "bright-field-microscopy", "histology", "onnx", "dsb2018"],
        inputs=inputs, outputs=outputs, version=spec.Version("0.1.0"),
        weights=spec.WeightsDescr(onnx=spec.OnnxWeightsDescr(
            source=os.path.join(folder, onnx_file), opset_version=info.onnx_opset or 17,
            comment="tf2onnx export of the tf-keras model, checked against TensorFlow by jobs/export.py; it returns "
                    "logits (the softmax is the declared postprocessing)")))


def export_bioimageio(model_path: str, output: str, check_images: list[np.ndarray], source: str, name: str,
                      tolerance: float = 1e-4) -> dict:
    """Write `output` (a .zip): the model's ONNX export (checked against TensorFlow on `check_images`) with its
    normalisation, test tensors from one image of `source`, cover and card, then run bioimageio.core's test_model on
    the written package. Raises, leaving nothing at `output`, when the package does not pass."""
    from bioimageio.core import test_model
    from bioimageio.spec import save_bioimageio_package

    with tempfile.TemporaryDirectory() as folder:
        onnx_file = os.path.join(folder, "model.onnx")
        checked = export_onnx(model_path, onnx_file, check_images, tolerance)
        info = read_model_info(onnx_file)
        classes = info.classes or CLASS_NAMES[int(info.num_classes or 3)]
        image = test_image(source)
        probabilities = OnnxModel(onnx_file, threads=1).probabilities(stretched(image)[None])
        np.save(os.path.join(folder, "test_input.npy"), image[None])
        np.save(os.path.join(folder, "test_output.npy"), probabilities.astype(np.float32))
        cv2.imwrite(os.path.join(folder, "sample_input.png"), image[..., ::-1])
        tifffile.imwrite(os.path.join(folder, "sample_output.tif"), probabilities[0].astype(np.float32))
        _cover(image, probabilities[0], os.path.join(folder, "cover.png"))
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as stream:
            stream.write(_card(info, name, classes))
        description = _description(folder, "model.onnx", info, name, classes)
        partial = f"{output}.partial-{os.getpid()}.zip"
        save_bioimageio_package(description, output_path=partial)
    started = time.time()
    summary = test_model(partial)
    if summary.status != "passed":
        os.remove(partial)
        failed = [entry.name for entry in summary.details if entry.status != "passed"]
        raise ValueError(f"the bioimage.io package did not pass bioimageio.core's test_model ({'; '.join(failed)}); "
                         f"nothing written")
    os.replace(partial, output)
    return {"package": output, "test_model": summary.status, "test_seconds": round(time.time() - started, 1),
            "max_abs_difference": checked["max_abs_difference"], "images": checked["images"]}


def run_bioimageio_export(config) -> dict:
    """jobs/export.py --format bioimageio: config.model as a bioimage.io package at config.output."""
    model_path = resolve_model(config.model)
    info = read_model_info(model_path)
    source, images = check_images_for(config, info)
    name = os.path.basename(os.path.dirname(os.path.abspath(model_path)))  # the shipped model's or the run's folder
    result = export_bioimageio(model_path, config.output or f"{name}.bioimageio.zip", images,
                               config.check_images or info.data, name, config.tolerance)
    return {**result, "check_source": source}
