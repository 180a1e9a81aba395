"""The exported model (ONNX) on a machine with a GPU and no TensorFlow or Ray: CPU against GPU, side by side.

    python benchmarks/gpu_inference.py --model dsb2018.onnx --images FOLDER

(`jobs/export.py` writes the ONNX file and its specialists; FOLDER is Kaggle's test layout or plain images.)
The GPU runs through ONNX Runtime's CUDA provider when onnxruntime-gpu is installed, else through PyTorch on
CUDA with the graph converted by onnx2torch (same weights; its largest difference from ONNX Runtime is printed).
PyTorch and onnx2torch are not the project's dependencies (CI never runs this): install them where the GPU is,
`pip install torch onnx2torch`.
The CPU is ONNX Runtime with every core. Medians of interleaved turns:
(1) the network's forward pass: a batch of 32 crops of 128x128, and one 512x640 image;
(2) every image predicted with the model's stored settings (flips, scales, size normalisation, the stained
    specialist), then the post-processing (watershed, filter, outline refiner), which runs on the CPU either way;
(3) with PyTorch, a training step's arithmetic on the GPU: forward, backward and Adam on the converted network
    at the preset's batch (16 crops of 128x128), cross-entropy. A proxy only: the export folds most BatchNorm
    layers into the convolutions, and Ray Train with TensorFlow is not what runs.
Last line: `ratio=<GPU over CPU images/s, stored settings, prediction only>`. PyTorch convolves in TF32 on the
GPU by default: on an H200 its probabilities differed from the CPU's by up to 0.07 at a pixel (1.9e-3 on random input).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from common import interleaved_medians


def explicit_padding(model):
    """The ONNX graph with each convolution's SAME_UPPER padding written out (onnx2torch takes no auto_pad).

    Odd kernels at stride 1 pad (k - 1) / 2 on each side; at stride 2 the input's size is even (the U-Net takes
    multiples of 32), so SAME pads k - 2 after and none before, as TensorFlow does.
    """
    from onnx import helper

    for node in model.graph.node:
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        if node.op_type != "Conv" or attributes.get("auto_pad") != b"SAME_UPPER":
            continue
        kernel, strides = list(attributes["kernel_shape"]), list(attributes.get("strides", [1, 1]))
        if any(size % 2 == 0 for size in kernel) or any(stride not in (1, 2) for stride in strides):
            raise NotImplementedError(f"{node.name}: SAME padding of kernel {kernel}, strides {strides}")
        before = [(size - 1) // 2 if stride == 1 else 0 for size, stride in zip(kernel, strides)]
        after = [(size - 1) // 2 if stride == 1 else size - 2 for size, stride in zip(kernel, strides)]
        kept = [attribute for attribute in node.attribute if attribute.name != "auto_pad"]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("pads", before + after)])
    return model


def torch_forward(path: str, device: str = "cuda"):
    """(images -> softmax probabilities, the torch module) of an ONNX file converted by onnx2torch, on `device`."""
    import onnx
    import torch
    from onnx2torch import convert

    network = convert(explicit_padding(onnx.load(path))).eval().to(device)

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = network(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
            return torch.softmax(logits, dim=-1).cpu().numpy()

    return forward, network


def gpu_forwards(model_path: str, specialists: dict, cpu_forward, device: str) -> tuple[str, dict]:
    """('runtime', {'': forward, kind: forward}) on the GPU, checked against the CPU on one real-sized input."""
    import onnxruntime as ort

    from pipeline.model.onnx import OnnxModel

    paths = {"": model_path, **specialists}
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        runtime = "ONNX Runtime, CUDA provider"
        forwards = {kind: OnnxModel(path, use_gpu=True).probabilities for kind, path in paths.items()}
    else:
        import torch

        runtime = f"PyTorch {torch.__version__} on {device} (onnx2torch)"
        forwards = {kind: torch_forward(path, device)[0] for kind, path in paths.items()}
    probe = np.random.default_rng(0).random((2, 256, 320, 3), dtype=np.float32)
    difference = float(np.abs(forwards[""](probe) - cpu_forward(probe)).max())
    print(f"GPU runtime: {runtime}; largest |GPU - CPU| probability on a random 256x320 pair: {difference:.1e}")
    return runtime, forwards


def load_images(folder: str, appearance: str, limit: int) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(image id, original RGB uint8, model input in [0, 1], kind) of the first `limit` images of `folder`."""
    from pipeline.data.augment import apply_appearance
    from pipeline.io.images import normalise
    from pipeline.data.protocol import image_kind
    from pipeline.io.sources import list_images, load_sample

    refs = list_images(folder).refs[:limit]
    images = []
    for ref in refs:
        original = load_sample(ref, with_masks=False).image
        images.append((ref.image_id, original, normalise(apply_appearance(original, appearance)),
                       image_kind(original)))
    return images


def training_proxy(model_path: str, steps: int = 30, device: str = "cuda") -> float:
    """Samples/s of forward + backward + Adam on the converted network, batch 16 of 128x128, on `device`."""
    import torch

    _, network = torch_forward(model_path, device)
    network.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    generator = np.random.default_rng(0)
    images = torch.from_numpy(generator.random((16, 128, 128, 3), dtype=np.float32)).to(device)
    labels = torch.from_numpy(generator.integers(0, 3, (16, 128, 128))).to(device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = network(images)
        loss = torch.nn.functional.cross_entropy(logits.permute(0, 3, 1, 2), labels)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return steps * 16 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an ONNX file written by jobs/export.py")
    parser.add_argument("--images", required=True, help="a folder of images (Kaggle's test layout or plain files)")
    parser.add_argument("--limit", type=int, default=120, help="images of the folder to use")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved turns; medians are quoted")
    parser.add_argument("--device", default="cuda", help="PyTorch's device for the 'GPU' side (cpu: a dry run of "
                                                         "this script on a machine without a GPU)")
    args = parser.parse_args()

    from pipeline.config import SegmentConfig
    from pipeline.segment.postprocess import labels_at_original_size, postprocess_settings, prediction_settings
    from pipeline.segment.predictor import Predictor
    from pipeline.model.registry import read_model_info, specialist_files

    cores = os.cpu_count() or 1
    info = read_model_info(args.model)
    config = SegmentConfig(model=args.model)
    predicting, post = prediction_settings(config, info), postprocess_settings(config, info)
    specialists = specialist_files(args.model, info)
    cpu = Predictor(args.model, batch_size=1, threads=cores, **predicting)
    runtime, forwards = gpu_forwards(args.model, specialists, cpu.forward, args.device)
    gpu = Predictor(args.model, batch_size=1, threads=1, specialists={}, **predicting)
    gpu.forward, gpu.forwards = forwards[""], {kind: forwards[kind] for kind in specialists}

    crops = np.random.default_rng(1).random((32, 128, 128, 3), dtype=np.float32)
    whole = np.random.default_rng(2).random((1, 512, 640, 3), dtype=np.float32)
    forward_times = interleaved_medians({"cpu crops": lambda: cpu.forward(crops), "gpu crops": lambda: gpu.forward(crops),
                                         "cpu whole": lambda: cpu.forward(whole),
                                         "gpu whole": lambda: gpu.forward(whole)}, repeats=7)
    print(f"forward pass, {cores} CPU cores (ONNX Runtime) against the GPU ({runtime}):")
    print(f"  32 crops of 128x128: CPU {32 / forward_times['cpu crops']:.0f} crops/s, "
          f"GPU {32 / forward_times['gpu crops']:.0f} crops/s, ratio {forward_times['cpu crops'] / forward_times['gpu crops']:.1f}")
    print(f"  one 512x640 image: CPU {1000 * forward_times['cpu whole']:.1f} ms, GPU "
          f"{1000 * forward_times['gpu whole']:.1f} ms, ratio {forward_times['cpu whole'] / forward_times['gpu whole']:.1f}")

    images = load_images(args.images, info.appearance, args.limit)
    results = {}

    def predict_all(predictor, name):
        results[name] = [predictor.predict_whole(model_input, kind) for _, _, model_input, kind in images]

    times = interleaved_medians({"cpu": lambda: predict_all(cpu, "cpu"), "gpu": lambda: predict_all(gpu, "gpu")},
                                repeats=args.repeats)
    started = time.perf_counter()
    objects = 0
    for (_, original, _, kind), probabilities in zip(images, results["gpu"]):
        labels = labels_at_original_size(probabilities, *original.shape[:2], post.for_kind(kind), original)
        objects += int(labels.max())
    post_seconds = time.perf_counter() - started
    largest = max(float(np.abs(a - b).max()) for a, b in zip(results["cpu"], results["gpu"]))
    count = len(images)
    settings = json.dumps({key: value for key, value in predicting.items() if key != "size_normalisation"})
    print(f"{count} images, stored settings {settings}, size normalisation "
          f"{'on' if predicting['size_normalisation'] else 'off'}, specialists {sorted(specialists) or 'none'}:")
    print(f"  prediction: CPU {count / times['cpu']:.2f} images/s, GPU {count / times['gpu']:.2f} images/s "
          f"(largest |GPU - CPU| probability {largest:.1e})")
    print(f"  post-processing on the CPU (one process): {count / post_seconds:.2f} images/s, {objects} nuclei")
    print(f"  prediction + post-processing, one process: CPU {count / (times['cpu'] + post_seconds):.2f} images/s, "
          f"GPU {count / (times['gpu'] + post_seconds):.2f} images/s")
    try:
        import torch

        name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
        print(f"training-step proxy (PyTorch on {name}, batch 16 of 128x128, forward + backward + Adam): "
              f"{training_proxy(args.model, device=args.device):.0f} samples/s")
    except ImportError:
        print("training-step proxy: skipped (no PyTorch)")
    print(f"ratio={times['cpu'] / times['gpu']:.2f}")


if __name__ == "__main__":
    main()
