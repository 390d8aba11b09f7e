"""MUMC's learning-rate schedules, against their closed forms: pretraining warm-up from 1e-6 then
3e-4 * 0.9^epoch with epochs counted from step 0 (Pretrain.py); VQA cosine set per epoch with a 1e-8 floor
(VQA.py cosine_lr_schedule)."""
import math

import numpy as np
import pytest

from jaxboost.config import load_config
from jaxboost.train import mumc_pretrain, mumc_vqa, optim


def test_pretraining_schedule_warms_from_1e6_and_decays_from_step_0():
    o = load_config("configs/mumc_pretrain.py:full").optim
    assert o.schedule == "mumc_epoch_decay" and o.warmup_lr == 1e-6
    lr = optim.SCHEDULES.get(o.schedule)(o, 100_000, 5000)
    want = {0: 1e-6, 1500: 1e-6 + (3e-4 - 1e-6) * 0.5, 3000: 3e-4, 4999: 3e-4, 5000: 3e-4 * 0.9,
            12_000: 3e-4 * 0.9 ** 2}
    for step, value in want.items():
        assert float(lr(step)) == pytest.approx(value, rel=1e-5), step


def test_vqa_cosine_is_set_per_epoch_with_its_floor():
    o = load_config("configs/mumc_vqa.py:full").optim
    assert o.schedule == "mumc_epoch_cosine"
    epochs, per_epoch = 40, 100
    lr = optim.SCHEDULES.get(o.schedule)(o, epochs * per_epoch, per_epoch)
    closed = lambda e: 1e-8 + (2e-5 - 1e-8) * 0.5 * (1 + math.cos(math.pi * e / epochs))
    for step in (0, 99, 100, 2050, 3999):
        assert float(lr(step)) == pytest.approx(closed(step // per_epoch), rel=1e-5), step
    assert float(lr(epochs * per_epoch)) == pytest.approx(1e-8, rel=1e-4)
    np.testing.assert_equal(float(lr(150)), float(lr(199)))
    assert mumc_pretrain and mumc_vqa   # importing the trainers registers their schedules
