"""The training callbacks, each on its own with a real (tiny) Keras model: time limit and the re-planned decay,
throughput, resumable early stopping, snapshots."""
import os
import time

import numpy as np
import pytest

from pipeline.train.callbacks import EncoderSchedule, EpochPlan, ResumableEarlyStopping, Snapshots, Throughput, TimeLimit
from pipeline.model.tfkeras import keras


def tiny_model():
    model = keras.Sequential([keras.layers.Conv2D(2, 1, input_shape=(8, 8, 3))])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(count=32):
    rng = np.random.default_rng(0)
    return rng.random((count, 8, 8, 3), np.float32), rng.integers(0, 2, (count, 8, 8, 1))


def test_time_limit_stops_at_the_deadline_and_plans_the_decay_to_end_there(capsys):
    images, masks = data()
    plan = EpochPlan(10)
    history = tiny_model().fit(images, masks, epochs=10, verbose=0,
                               callbacks=[TimeLimit(time.time() - 1, plan, minutes=0.5)])
    assert len(history.history["loss"]) == 1 and plan.epochs <= 1  # past the deadline: the first epoch is the last
    assert "time limit: stopping after epoch 1" in capsys.readouterr().out

    plan = EpochPlan(4)
    history = tiny_model().fit(images, masks, epochs=4, verbose=0, callbacks=[TimeLimit(time.time() + 3600, plan)])
    assert len(history.history["loss"]) == 4 and plan.epochs == 4  # an hour fits them all: the plan stays
    plan = EpochPlan(4)
    tiny_model().fit(images, masks, epochs=4, verbose=0, callbacks=[TimeLimit(0.0, plan)])
    assert plan.epochs == 4  # no deadline: nothing re-planned


def test_throughput_counts_the_steps_and_samples_of_each_epoch():
    images, masks = data(40)
    history = tiny_model().fit(images, masks, batch_size=8, epochs=2, verbose=0, callbacks=[Throughput(40, world=2)])
    assert history.history["steps"] == [5, 5]
    seconds = np.asarray(history.history["epoch_seconds"])
    np.testing.assert_allclose(history.history["samples_per_second"], 80 / seconds)


def test_encoder_schedule_holds_the_encoder_for_the_frozen_epochs_then_scales_it():
    from pipeline.config import TrainConfig
    from pipeline.model.network import EncoderScaledAdam
    from pipeline.train.schedule import encoder_scale_at

    model = tiny_model()
    model.compile(optimizer=EncoderScaledAdam(1e-3, 0.0).scale_encoder(model.trainable_weights),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    scales = []
    record = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: scales.append(
        float(model.optimizer.encoder_scale.numpy())))
    config = TrainConfig(frozen_encoder_epochs=2, encoder_lr_scale=0.25)
    schedule = EncoderSchedule(lambda epoch: encoder_scale_at(epoch, config))
    model.fit(*data(), epochs=4, verbose=0, callbacks=[schedule, record])
    assert scales == [0.0, 0.0, 0.25, 0.25]


def test_early_stopping_resumes_with_its_saved_best_and_patience():
    images, masks = data()
    saved = {"best": -1.0, "wait": 1, "best_epoch": 0}  # a best no epoch can beat, one epoch of patience used
    weights = tiny_model().get_weights()
    stopping = ResumableEarlyStopping(saved, weights, monitor="loss", patience=2, restore_best_weights=True)
    model = tiny_model()
    # resumed after epoch 1, as a restarted worker does
    history = model.fit(images, masks, epochs=10, initial_epoch=1, verbose=0, callbacks=[stopping])
    assert len(history.history["loss"]) == 1  # patience ran out after one more epoch
    assert stopping.state() == {"best": -1.0, "wait": 2, "best_epoch": 0}
    for restored, best in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(restored, best)  # the saved best weights came back


@pytest.mark.parametrize("rank", [0, 1])
def test_snapshots_draw_input_truth_and_prediction_on_rank_zero_only(tmp_path, rank):
    images, masks = data(3)
    tiny_model().fit(images, masks, epochs=2, verbose=0, callbacks=[Snapshots(images, masks, str(tmp_path), rank)])
    pictures = sorted(os.listdir(tmp_path / "snapshots")) if rank == 0 else []
    if rank == 0:
        import cv2

        assert pictures == ["epoch_001.png", "epoch_002.png"]
        strip = cv2.imread(str(tmp_path / "snapshots" / pictures[0]))
        assert strip.shape == (3 * 8, 3 * 8, 3)  # a row per image: input | truth | prediction
    else:
        assert not (tmp_path / "snapshots").exists()


def test_the_driver_shows_each_console_line_of_the_workers_once(tmp_path, capsys):
    """console_of shows the lines workers add to logs/console.txt while training runs, each once, whole lines
    only, and not the lines of an earlier (resumed) run; say() without a run folder writes no file."""
    import threading

    from pipeline.train.files import CONSOLE_FILE, console_of, epoch_line, say

    say(str(tmp_path), "from the killed run")
    capsys.readouterr()
    with console_of(str(tmp_path), interval=0.05):
        worker = threading.Thread(target=lambda: [say(str(tmp_path), epoch_line(
            {"epoch": epoch, "loss": 0.41234, "val_loss": 0.5, "epoch_seconds": 9.2}, 3)) for epoch in (1, 2, 3)])
        worker.start()
        worker.join()
        with open(tmp_path / CONSOLE_FILE, "a") as stream:
            stream.write("half a li")  # a line still being written is not shown
    shown = capsys.readouterr().out.splitlines()
    assert sorted(line for line in shown if line.startswith("epoch")) == sorted(
        [f"epoch {epoch}/3: loss 0.412, val_loss 0.5, 9 s" for epoch in (1, 2, 3)] * 2)  # printed by say, shown once
    assert "from the killed run" not in shown and "half a li" not in shown
    say("", "no run folder")
    assert not (tmp_path.parent / "logs").exists() and not os.path.exists(os.path.join("logs", "console.txt"))
