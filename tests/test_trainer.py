"""The phase-2 optimizer: SGD with momentum at the configured rate, gradients clipped element-wise."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from finetune.trainer import phase2_optimizer


def one_step(clipvalue: float | None, gradient: list[float]) -> np.ndarray:
    """The change one SGD step (rate 0.5, no momentum) makes to a zero variable given this gradient."""
    cfg = OmegaConf.create({"learning_rate": 0.5, "momentum": 0.0, "schedule": "constant", "epochs": 1,
                            "clipvalue": clipvalue})
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
    cfg = OmegaConf.create({"learning_rate": 3e-4, "momentum": 0.9, "schedule": "cosine", "epochs": 10, "clipvalue": 0.2})
    optimizer = phase2_optimizer(cfg, steps_per_epoch=25)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == pytest.approx(0.9)
    assert optimizer.clipvalue == pytest.approx(0.2)
    assert float(optimizer.learning_rate) == pytest.approx(3e-4)
    optimizer.iterations.assign(250)
    assert float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-9)  # decayed to zero at the phase's end
