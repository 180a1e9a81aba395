"""Training step speed with and without XLA (`jit_compile=True`): the preset's model, loss and batch, side by side.

Both models are built and compiled the same way (seed 0) but for `jit_compile`, warmed up by one short fit (graph
tracing, XLA compilation), then fit one epoch each in turns, so drifts in machine load hit both alike. Random
crops are enough: the arithmetic per step does not depend on the pixels. Last line: `ratio=<xla/plain>` (above 1:
XLA trains faster).
"""
from __future__ import annotations

import argparse

from common import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=4, help="timed epochs per variant (medians are quoted)")
    args = parser.parse_args()

    import numpy as np

    from pipeline.config import TRAIN_PRESETS
    from pipeline.model.network import build_unet, compile_model
    from pipeline.model.tfkeras import keras

    preset = TRAIN_PRESETS["dsb2018"]
    size, classes, batch = preset["image_size"], preset["num_classes"], preset["batch_size"]
    rng = np.random.default_rng(0)
    images = rng.random((batch * args.steps, size, size, 3), np.float32)
    masks = rng.integers(0, classes, (batch * args.steps, size, size, 1)).astype(np.int32)

    def compiled(jit: bool):
        keras.utils.set_random_seed(0)
        model = build_unet(size, classes, encoder_width=preset["encoder_width"], decoder_width=preset["decoder_width"])
        compile_model(model, preset["learning_rate"], classes, preset["loss"])
        model.jit_compile = jit  # tf-keras rebuilds its train function with XLA
        model.fit(images[:2 * batch], masks[:2 * batch], batch_size=batch, epochs=1, verbose=0)
        return model

    models = {"plain": compiled(False), "xla": compiled(True)}
    if not models["xla"].jit_compile:
        raise SystemExit("this TensorFlow build cannot compile with XLA")
    seconds = interleaved_medians(
        {name: (lambda model=model: model.fit(images, masks, batch_size=batch, epochs=1, verbose=0))
         for name, model in models.items()}, args.repeats)
    for name, value in seconds.items():
        print(f"{name}: {len(images) / value:.1f} samples/s (median of {args.repeats} epochs of {args.steps} batches of {batch})")
    print(f"ratio={seconds['plain'] / seconds['xla']:.2f}")


if __name__ == "__main__":
    main()
