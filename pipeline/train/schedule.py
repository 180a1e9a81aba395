"""Training schedules, pure arithmetic on the config: the learning rate by epoch (warm-up, cosine decay), the encoder's
step scale (frozen, then scaled), and how many epochs fit a time limit."""
from __future__ import annotations

import math

from pipeline.config import TrainConfig


def epochs_that_fit(done: int, seconds_left: float, epoch_seconds: float, reserved_epochs: float = 0.0) -> int:
    """How many epochs a time-limited run can reach: those done, plus the whole epochs (at the last one's speed)
    that end before the deadline with `reserved_epochs` epochs' time still left (for the --tune step)."""
    return done + max(0, int(seconds_left // max(epoch_seconds, 1e-3) - reserved_epochs))



def learning_rate_at(epoch: int, config: TrainConfig, epochs: int | None = None) -> float:
    """Linear warm-up for `warmup_epochs`, then cosine decay to 5% of the peak at the last epoch.

    `epochs` is the number of epochs the run will actually have (fewer than config.epochs when a time
    limit cuts it short), so the decay still ends at the run's last epoch.
    """
    peak = config.learning_rate
    if epoch < config.warmup_epochs:
        return peak * (epoch + 1) / (config.warmup_epochs + 1)
    span = max(1, min(config.epochs, epochs or config.epochs) - config.warmup_epochs)
    progress = min(1.0, (epoch - config.warmup_epochs) / span)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))



def encoder_scale_at(epoch: int, config: TrainConfig) -> float:
    """The encoder's step as a fraction of the decoder's: 0 during a frozen warm-up, then --encoder-lr-scale."""
    return 0.0 if epoch < config.frozen_encoder_epochs else config.encoder_lr_scale



def encoder_scale(config: TrainConfig) -> float | None:
    """The first epoch's encoder scale, or None when the encoder trains as the rest (plain Adam)."""
    if config.frozen_encoder_epochs <= 0 and config.encoder_lr_scale == 1.0:
        return None
    return encoder_scale_at(0, config)
