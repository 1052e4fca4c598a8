"""The optimizers' settings: phase 2's SGD with momentum and element-wise clipping; learning-rate schedules."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from finetune.trainer import learning_rate, phase2_optimizer


def one_step(clipvalue: float | None, gradient: list[float]) -> np.ndarray:
    """The change one SGD step (rate 0.5, no momentum) makes to a zero variable given this gradient."""
    cfg = OmegaConf.create({"learning_rate": 0.5, "momentum": 0.0, "schedule": "constant", "warmup_fraction": 0.0,
                            "epochs": 1, "clipvalue": clipvalue})
    optimizer = phase2_optimizer(cfg, steps_per_epoch=1)
    variable = keras.Variable(np.zeros(len(gradient), "float32"))
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(np.array(gradient, "float32")), variable)])
    return variable.numpy()


def test_clipvalue_bounds_each_element_and_leaves_small_gradients_alone() -> None:
    step = one_step(clipvalue=0.2, gradient=[40.0, -7.0, 0.1, -0.05])
    np.testing.assert_allclose(step, [-0.1, 0.1, -0.05, 0.025])  # -lr * clip(g, -0.2, 0.2)


def test_without_clipvalue_the_full_gradient_is_applied() -> None:
    np.testing.assert_allclose(one_step(clipvalue=None, gradient=[40.0, -7.0]), [-20.0, 3.5])


def test_momentum_and_cosine_schedule_come_from_the_config() -> None:
    cfg = OmegaConf.create({"learning_rate": 3e-4, "momentum": 0.9, "schedule": "cosine", "warmup_fraction": 0.0,
                            "epochs": 10, "clipvalue": 0.2})
    optimizer = phase2_optimizer(cfg, steps_per_epoch=25)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == pytest.approx(0.9)
    assert optimizer.clipvalue == pytest.approx(0.2)
    assert float(optimizer.learning_rate) == pytest.approx(3e-4)
    optimizer.iterations.assign(250)
    assert float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)  # decayed to zero at the phase's end


@pytest.mark.parametrize(("schedule", "midway", "at_end"), [("cosine", 5e-4, 0.0), ("constant", 1e-3, 1e-3)])
def test_warmup_rises_from_zero_then_follows_the_schedule(schedule: str, midway: float, at_end: float) -> None:
    cfg = OmegaConf.create({"learning_rate": 1e-3, "schedule": schedule, "warmup_fraction": 0.2, "epochs": 10})
    rate = learning_rate(cfg, steps_per_epoch=25)  # 250 steps, the first 50 warm up
    assert [float(rate(step)) for step in (0, 25, 50)] == pytest.approx([0.0, 5e-4, 1e-3])
    assert float(rate(150)) == pytest.approx(midway)  # half-way from the warm-up's end to the phase's end
    assert float(rate(250)) == pytest.approx(at_end, abs=1e-9)
