"""WarmupSchedule: graph construct and Python twin against formulas written here, at boundaries and beyond."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ms_nlp_compress.train.schedules import WarmupSchedule

PEAK, TOTAL, WARMUP, END = 2e-3, 20, 5, 1e-4


def reference_lr(step, kind, peak=PEAK, total=TOTAL, warmup=WARMUP, power=2.0, end=END):
    """Independent twin: the schedule written piecewise by phase."""
    if warmup > 0 and step < warmup:
        return peak * step / warmup
    if kind == "constant":
        return peak
    if step >= total:
        return end
    progress = (step - warmup) / (total - warmup)
    shape = {"linear": 1 - progress,
             "cosine": (1 + math.cos(math.pi * progress)) / 2,
             "polynomial": (1 - progress) ** power}[kind]
    return end + (peak - end) * shape


STEPS = [0, 1, WARMUP - 1, WARMUP, WARMUP + 1, 12, TOTAL - 1, TOTAL, TOTAL + 1, 10 * TOTAL]
KINDS = ["constant", "linear", "cosine", "polynomial"]


@pytest.mark.parametrize("kind", KINDS)
def test_python_twin_matches_reference(kind):
    schedule = WarmupSchedule(PEAK, TOTAL, WARMUP, kind=kind, power=2.0, end_lr=END)
    for step in list(range(0, 2 * TOTAL)) + [10 * TOTAL]:
        assert schedule.lr_at(step) == pytest.approx(reference_lr(step, kind), rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_construct_matches_python_twin(mode):
    old = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE if mode == "pynative" else ms.GRAPH_MODE)
    try:
        for kind in KINDS:
            schedule = WarmupSchedule(PEAK, TOTAL, WARMUP, kind=kind, power=2.0, end_lr=END)
            for step in STEPS:
                # (1,) int32: the shape and dtype of nn.Optimizer.global_step.
                got = schedule(Tensor(np.array([step], np.int32))).asnumpy()
                assert got.shape == ()
                np.testing.assert_allclose(got, schedule.lr_at(step), rtol=1e-6, atol=1e-9,
                                           err_msg=f"{kind} step {step}")
    finally:
        ms.set_context(mode=old)


def test_boundaries():
    linear = WarmupSchedule(1.0, 10, 4, kind="linear")
    assert [linear.lr_at(s) for s in (0, 2, 4, 7, 10, 11, 100)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0, 0])
    no_warmup = WarmupSchedule(1.0, 10, 0, kind="cosine")
    assert no_warmup.lr_at(0) == 1.0 and no_warmup.lr_at(5) == pytest.approx(0.5)
    warmup_only = WarmupSchedule(1.0, 4, 4, kind="linear")  # decay phase of length 0
    assert [warmup_only.lr_at(s) for s in (0, 2, 3, 4, 5)] == pytest.approx([0, 0.5, 0.75, 0, 0])  # lr(T) = end


@pytest.mark.parametrize("kwargs, field", [
    (dict(peak_lr=1.0, total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(peak_lr=-1.0, total_steps=10), "peak_lr"),
    (dict(peak_lr=1.0, total_steps=10, kind="step"), "kind"),
    (dict(peak_lr=1.0, total_steps=0), "total_steps"),
    (dict(peak_lr=1.0, total_steps=10, warmup_steps=-1), "warmup_steps"),
    (dict(peak_lr=1.0, total_steps=10, kind="polynomial", power=0.0), "power"),
    (dict(peak_lr=1.0, total_steps=10, end_lr=2.0), "end_lr"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WarmupSchedule(**kwargs)
