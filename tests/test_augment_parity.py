"""Issue 23.2: one augmentation definition. The TF trainer and the JAX trainer draw from the
same ranges (``export.augment.RANGES``) and apply the same steps: given the same drawn
values, on a real crop, they must produce the same image. The shift suite's shifts inside
the training range are those ranges' ends."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import IN_CI, fixture_images

if not IN_CI:
    pytest.importorskip("jax", reason="the JAX trainer is the [jax] extra")
    pytest.importorskip("tensorflow", reason="the TF trainer is the [train] extra")
pytestmark = pytest.mark.train

from export.augment import BACKGROUND, RANGES, focus_tf, photometric_tf, stain_tf  # noqa: E402
from export.train_jax import focus_jax, photometric_jax, stain_jax  # noqa: E402
from smearscan.preprocess import Recipe, preprocess, read_image  # noqa: E402


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A real crop as both trainers see it: the scanner's preprocessing, float in [0, 1]."""
    return preprocess(read_image(str(fixture_images()[0])), Recipe()).astype(np.float32)


def _both(tf_step, jax_step, image: np.ndarray, *values) -> tuple[np.ndarray, np.ndarray]:
    import jax.numpy as jnp
    import tensorflow as tf

    as_tf = [tf.constant(np.asarray(v, np.float32)) for v in (image, *values)]
    as_jax = [jnp.asarray(np.asarray(v, np.float32)) for v in (image, *values)]
    return np.asarray(tf_step(tf, *as_tf)), np.asarray(jax_step(*as_jax))


def test_photometric_steps_agree(crop):
    cell = (crop.max(axis=-1, keepdims=True) > BACKGROUND).astype(np.float32)
    for gain, gamma, contrast in [(1.12, 0.85, 0.9), (0.86, 1.2, 1.14)]:
        by_tf, by_jax = _both(photometric_tf, photometric_jax, crop, cell, gain, gamma, contrast)
        assert np.abs(by_tf - crop).max() > 0.05  # the step did change the crop
        np.testing.assert_allclose(by_tf, by_jax, atol=2e-5)


def test_stain_and_hue_steps_agree(crop):
    scales, shifts = [1.05, 0.95, 1.02], [0.02, -0.01, 0.03]
    for turn in (RANGES.hue_turn, -0.5 * RANGES.hue_turn):
        by_tf, by_jax = _both(stain_tf, stain_jax, crop, scales, shifts, turn)
        assert np.abs(by_tf - crop).max() > 0.02
        np.testing.assert_allclose(by_tf, by_jax, atol=1e-4)


def test_focus_steps_agree(crop):
    for sigma, amount in [(1.2, -0.7), (0.6, 1.3)]:
        by_tf, by_jax = _both(focus_tf, focus_jax, crop, sigma, amount)
        assert np.abs(by_tf - crop).max() > 0.02
        np.testing.assert_allclose(by_tf, by_jax, atol=2e-5)


def test_the_strength_scales_every_range_but_the_smallest_blur():
    half = RANGES.at(0.5)
    assert half.gain == pytest.approx(RANGES.gain / 2)
    assert half.gamma == pytest.approx((0.8**0.5, 1.25**0.5))
    assert half.hue_degrees == pytest.approx(6.0)
    assert half.blur_sigma == (RANGES.blur_sigma[0], RANGES.blur_sigma[1] / 2)
    assert half.focus_chance == RANGES.focus_chance


def test_the_shift_suite_tests_the_ends_of_the_training_ranges():
    from export.shift import HUE_SHIFT_DEGREES, shifts

    names = set(shifts(0))
    assert {"brightness +15%", "brightness -15%", "gamma 0.8", "gamma 1.25"} <= names
    assert RANGES.gamma == pytest.approx((0.8, 1.25))
    # the scanner's QC admits what the training ranges cover (smearscan cannot import export)
    from smearscan.qc import VALIDATED_GAINS, VALIDATED_GAMMAS

    assert pytest.approx(RANGES.gamma) == VALIDATED_GAMMAS
    assert pytest.approx((1 - RANGES.gain, 1 + RANGES.gain)) == VALIDATED_GAINS
    assert HUE_SHIFT_DEGREES < RANGES.hue_degrees == pytest.approx(12.0)


def test_the_jax_augmenter_draws_from_the_ranges_and_keeps_crops_in_range(crop):
    """The JAX trainer's whole augmenter (jitted, vmapped) on real crops: every group runs,
    outputs stay in [0, 1] and differ per draw; at strength 0 with no flips or scale the
    photometric, stain and focus groups leave the cell as it is (all their ranges are 0)."""
    import jax

    from export.config import Augmentation
    from export.train_jax import make_augment

    batch = np.stack([np.round(crop * 255).astype(np.uint8)] * 4)
    sides = np.full(4, 300.0, np.float32)
    augment = jax.jit(make_augment(Augmentation(), crop.shape[0]))
    out = np.asarray(augment(jax.random.PRNGKey(0), batch, sides))
    assert out.shape == batch.shape and out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out[0] - out[1]).max() > 0.05  # each crop its own draw
    still = make_augment(
        Augmentation(groups=("photometric", "stain", "focus"), strength=0.0), crop.shape[0]
    )
    kept = np.asarray(jax.jit(still)(jax.random.PRNGKey(1), batch, sides))
    scaled = batch.astype(np.float32) * np.float32(1 / 255)  # as the trainer scales it
    cell = scaled.max(axis=-1, keepdims=True) > BACKGROUND  # the rest is set to black
    np.testing.assert_allclose(kept, scaled * cell, atol=2e-3)


def test_a_few_training_steps_agree_between_the_trainers(tmp_path):
    """The rest of the recipe written once for both trainers (issue 23.2): the same start,
    crops and batches through three steps of each trainer (Adam on the schedule's learning
    rate, the weight average's decay, batch norm re-estimated on clean crops) give the same
    model. A changed decay or re-estimation in one trainer moves probabilities by 0.14;
    the backends' own rounding by < 0.01."""
    import subprocess
    import sys

    from conftest import ROOT, clean_env

    script = str(ROOT / "tests" / "backend_training.py")
    # XLA's backend optimisation only fuses and schedules the JAX graph (the difference stays
    # 0.002); at level 0 it compiles in half the time, and this test is about the recipe
    unoptimised = {"tensorflow": {}, "jax": {"XLA_FLAGS": "--xla_backend_optimization_level=0"}}
    runs = [  # side by side: both draw the same start from one seed
        subprocess.Popen(
            [sys.executable, script, str(tmp_path)],
            env=clean_env(KERAS_BACKEND=backend, **unoptimised[backend]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for backend in ("tensorflow", "jax")
    ]
    for process in runs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
    by_tf, by_jax = np.load(tmp_path / "tensorflow.npy"), np.load(tmp_path / "jax.npy")
    assert by_tf.shape == by_jax.shape == (24, 2)
    assert np.ptp(by_tf[:, 0]) > 0.05  # the crops are told apart: a real comparison
    np.testing.assert_allclose(by_tf, by_jax, atol=0.02)
