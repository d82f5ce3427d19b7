"""Learning-rate schedules: linear warmup, then constant / linear / cosine / polynomial decay.

One Cell serves the optimizer (graph-compatible `construct(global_step)`) and the logger (`lr_at(step)`, plain
Python): the two are written side by side so that a change to one is visibly a change to the other, and the tests
compare them at every boundary.

Shape of every schedule, with p = peak_lr, W = warmup_steps, T = total_steps, e = end_lr:

    step < W            p * step / W                        (HuggingFace/BERT: step 0 has lr 0)
    W <= step           e + (p - e) * decay(progress),     progress = 1 - clip((T - step) / max(T - W, 1), 0, 1)
        constant        decay = 1                           (e unused)
        linear          decay = 1 - progress
        cosine          decay = 0.5 * (1 + cos(pi * progress))
        polynomial      decay = (1 - progress) ** power
    step >= T           e                                   (the schedule never goes negative or restarts)

`progress` is written from the end (as HuggingFace's linear schedule) so that lr(T) = e even when W = T.

With the optimizers of `optim.py`, update t (1-based) uses lr_at(t - 1).
"""
import math

import mindspore as ms
from mindspore import nn, ops

from ms_nlp_compress.errors import ConfigError

SCHEDULE_KINDS = ("constant", "linear", "cosine", "polynomial")


class WarmupSchedule(nn.learning_rate_schedule.LearningRateSchedule):
    """Linear warmup to `peak_lr` over `warmup_steps`, then a decay to `end_lr` at `total_steps`.

    Args:
        peak_lr: lr reached at the end of warmup (>= 0).
        total_steps: number of optimizer updates in the run (> 0); decays end here.
        warmup_steps: 0 <= warmup_steps <= total_steps. BERT-style fine-tuning uses 10 % of total_steps.
        kind: "constant", "linear", "cosine" or "polynomial".
        power: exponent of the polynomial decay (> 0); 1.0 is linear.
        end_lr: lr after total_steps for the decaying kinds (0 <= end_lr <= peak_lr).
    """

    def __init__(self, peak_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "linear",
                 power: float = 1.0, end_lr: float = 0.0):
        super().__init__()
        if kind not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule kind: unknown value {kind!r}; expected one of {list(SCHEDULE_KINDS)}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ConfigError(f"schedule total_steps: must be a positive int, got {total_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"schedule warmup_steps: must be an int >= 0, got {warmup_steps!r}")
        if warmup_steps > total_steps:
            raise ConfigError(f"schedule warmup_steps: {warmup_steps} is larger than total_steps {total_steps}")
        if not peak_lr >= 0.0:  # also rejects NaN
            raise ConfigError(f"schedule peak_lr: must be >= 0, got {peak_lr!r}")
        if not 0.0 <= end_lr <= peak_lr:
            raise ConfigError(f"schedule end_lr: must be in [0, peak_lr={peak_lr}], got {end_lr!r}")
        if not power > 0.0:
            raise ConfigError(f"schedule power: must be > 0, got {power!r}")
        self.kind = kind
        self.peak_lr = float(peak_lr)
        self.end_lr = float(end_lr)
        self.power = float(power)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        # max(., 1) keeps the divisions finite when there is no warmup or no decay phase.
        self._warmup_span = float(max(warmup_steps, 1))
        self._decay_span = float(max(total_steps - warmup_steps, 1))

    def construct(self, global_step):
        """lr for `global_step` (int Tensor, any shape with one element, e.g. the optimizer's (1,) counter)."""
        step = global_step.astype(ms.float32).reshape(())
        warmup_lr = self.peak_lr * step / self._warmup_span
        progress = 1.0 - ops.clamp((self.total_steps - step) / self._decay_span, 0.0, 1.0)
        if self.kind == "constant":
            decayed_lr = self.peak_lr * ops.ones_like(progress)
        else:
            if self.kind == "linear":
                decay = 1.0 - progress
            elif self.kind == "cosine":
                decay = 0.5 * (1.0 + ops.cos(math.pi * progress))
            else:
                decay = ops.pow(1.0 - progress, self.power)
            decayed_lr = self.end_lr + (self.peak_lr - self.end_lr) * decay
        return ops.select(step < self.warmup_steps, warmup_lr, decayed_lr)

    def lr_at(self, step: int) -> float:
        """The same lr as `construct`, in plain Python (for logs and configs; no Tensor, no graph)."""
        if step < self.warmup_steps:
            return self.peak_lr * step / self._warmup_span
        if self.kind == "constant":
            return self.peak_lr
        progress = 1.0 - min(max((self.total_steps - step) / self._decay_span, 0.0), 1.0)
        if self.kind == "linear":
            decay = 1.0 - progress
        elif self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            decay = (1.0 - progress) ** self.power
        return self.end_lr + (self.peak_lr - self.end_lr) * decay
