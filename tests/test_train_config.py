"""The typed training config: one value from the command line to the stored run and back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ROOT

from export import train
from export.config import LEGACY_DEFAULTS, ConfigError, Schedule, TrainConfig
from smearscan.colour import EDGE_MARGIN

pytestmark = pytest.mark.train


def test_a_config_survives_its_stored_record():
    config = train.parse_config(
        ["--data", "d", "--out", "o", "--width", "0.25", "--augment", "full,jpeg", "--seed", "3"]
    )
    back = TrainConfig.from_record(json.loads(json.dumps(config.to_record())))
    assert back == config
    assert back.augmentation.groups[-1] == "jpeg" and back.network.width == 0.25


def test_every_committed_run_reads_back_and_the_shipped_one_is_the_default():
    runs = sorted((ROOT / "export").glob("**/config.json"))
    assert len(runs) >= 8
    read = 0
    for path in runs:
        record = json.loads(path.read_text())["args"]
        if {"ema", "select"} <= set(record):  # runs older than the EMA have no known legacy value
            TrainConfig.from_record(record)
            read += 1
        else:
            with pytest.raises(ConfigError, match="predates"):
                TrainConfig.from_record(record)
    assert read >= 4
    shipped = TrainConfig.of_run(ROOT / "export" / "default_model" / "fold_0")
    assert (
        shipped.differences(train.parse_config(["--data", str(shipped.data), "--out", "x"])) == []
    )


def test_options_added_since_take_what_older_runs_did():
    record = TrainConfig(Path("d"), Path("o")).to_record()
    for name in LEGACY_DEFAULTS:
        record.pop(name)
    older = TrainConfig.from_record(record)
    assert older.augmentation.scale_at == "input" and older.split.method == "donors"
    assert older.schedule.warmup_epochs == 0  # runs made before the warm-up had none


def test_differences_ignore_where_a_run_happens_and_name_what_it_trains():
    base = TrainConfig(Path("d"), Path("runs/a"))
    moved = replace(base, out=Path("elsewhere"), workers=7, quiet=True, cache_dir=Path("c"))
    assert base.differences(moved) == []
    assert base.differences(base.for_fold(2, Path("runs/a/fold_2"))) == []
    longer = replace(base, schedule=replace(base.schedule, epochs=30))
    assert base.differences(longer) == ["epochs"]
    # a fine-tuned run freezes batch norm unless told otherwise: None and True agree then
    tuned = replace(base, init_from="default")
    assert tuned.differences(replace(tuned, freeze_batch_norm=True)) == []


def test_the_stain_strength_is_its_own_and_left_out_is_the_augmentation_strength():
    from export.augment import RANGES
    from export.config import Augmentation

    split = train.parse_config(
        ["--data", "d", "--out", "o", "--augment-strength", "1", "--stain-strength", "0.5"]
    )
    ranges = split.augmentation.ranges
    assert ranges.gain == RANGES.gain and ranges.blur_sigma == RANGES.blur_sigma
    assert ranges.gamma == pytest.approx(RANGES.gamma)
    assert ranges.hue_degrees == pytest.approx(6.0)
    assert ranges.stain_scale == pytest.approx(RANGES.stain_scale / 2)
    assert TrainConfig.from_record(json.loads(json.dumps(split.to_record()))) == split
    base = TrainConfig(Path("d"), Path("o"))
    assert base.differences(split) == ["stain_strength"]
    same = replace(base, augmentation=replace(base.augmentation, stain_strength=1.0))
    assert base.differences(same) == []  # 1.0 is what leaving it out meant
    with pytest.raises(ConfigError, match="stain-strength"):
        Augmentation(stain_strength=-0.5)


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": 0},
        {"ema": 1.0},
        {"lr": float("nan")},
        {"select": "first"},
        {"epochs": 10, "warmup_epochs": 10},
        {"warmup_epochs": -1},
    ],
)
def test_unusable_values_are_refused_by_the_type(change):
    with pytest.raises(ConfigError):
        Schedule(**change)


def test_slide_colour_is_recorded_and_refused_where_it_would_mean_nothing():
    config = train.parse_config(["--data", "d", "--out", "o", "--slide-colour"])
    assert config.slide_colour and TrainConfig.from_record(config.to_record()) == config
    assert config.slide_colour_margin == EDGE_MARGIN > 0
    plain = TrainConfig(Path("d"), Path("o"))
    assert plain.differences(config) == ["slide_colour", "slide_colour_margin"]
    # the margin means nothing without the normalisation, so it does not split runs
    assert plain.differences(replace(plain, slide_colour_margin=0)) == []
    whole_cell = replace(config, slide_colour_margin=0)
    assert config.differences(whole_cell) == ["slide_colour_margin"]
    # runs made before the margin existed measured the whole cell
    legacy = {k: v for k, v in whole_cell.to_record().items() if k != "slide_colour_margin"}
    assert TrainConfig.from_record(legacy) == whole_cell
    with pytest.raises(ConfigError, match="margin"):
        train.parse_config(["--data", "d", "--out", "o", "--slide-colour-margin", "-1"])
    for argv, reason in [
        (["--augment", "full,colour"], "colour augmentation"),
        (["--init-from", "default"], "from scratch"),
        (["--distill-from", "default"], "from scratch"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            train.parse_config(["--data", "d", "--out", "o", "--slide-colour", *argv])


def test_a_newer_stored_config_is_refused():
    with pytest.raises(ConfigError, match="version 2"):
        TrainConfig.from_record(TrainConfig(Path("d"), Path("o")).to_record(), version=2)


def test_the_learning_rate_warms_up_then_decays_and_without_warm_up_is_the_old_schedule():
    """Issue 26.1 (longer schedules with a warm-up): one schedule for both trainers."""
    keras = pytest.importorskip("keras", reason="the trainers are the [train] extra")
    steps = 100
    warm = Schedule(epochs=30, lr=2e-3, warmup_epochs=2).learning_rate(keras, steps)
    rate = [float(warm(step)) for step in (0, 100, 200, 1600, 3000)]
    assert rate[0] == pytest.approx(2e-5)  # lr / 100
    assert rate[1] == pytest.approx((2e-5 + 2e-3) / 2, rel=1e-3)  # linear, halfway
    assert rate[2] == pytest.approx(2e-3)  # the peak, where the cosine starts
    assert rate[2] > rate[3] > rate[4] == pytest.approx(0.05 * 2e-3)
    plain = Schedule(epochs=10).learning_rate(keras, steps)
    old = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=1000, alpha=0.05)
    assert [float(plain(s)) for s in (0, 500, 1000)] == [float(old(s)) for s in (0, 500, 1000)]


def test_mixup_blends_each_crop_with_another_of_its_batch(tmp_path):
    """``--mixup``: images and targets blended by one share with a reordering of the same
    batch (``export.augment.mixup_blend``), so the batch keeps its mean image and mean
    target while single targets become soft."""
    import numpy as np

    from export.config import Augmentation

    x, images, targets = first_training_batch(tmp_path, Augmentation(groups=(), mixup=0.4), 8)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    assert ((targets > 0.01) & (targets < 0.99)).any()  # soft targets: crops were blended
    np.testing.assert_allclose(targets.mean(axis=0), [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(images.mean(axis=0), (x / 255.0).mean(axis=0), atol=1e-5)
    assert not np.allclose(
        np.sort(images.reshape(8, -1), axis=0), np.sort(x.reshape(8, -1) / 255.0, axis=0)
    )


def test_consistency_pairs_each_crop_with_a_turned_copy_and_pulls_their_outputs_together(
    tmp_path,
):
    """``--consistency``: a batch holds the crops, then each one's flipped or turned copy
    (never itself); the loss adds the weight times the squared gap between the two outputs."""
    import keras
    import numpy as np

    from export.augment import consistency_loss
    from export.config import Augmentation, ConfigError
    from smearscan.inference import tta_views

    with pytest.raises(ConfigError, match="mixup"):
        Augmentation(consistency=0.5, mixup=0.2)
    augmentation = Augmentation(groups=(), consistency=0.5)
    x, images, targets = first_training_batch(tmp_path, augmentation, 3, crops=6)
    assert images.shape == (6, 128, 128, 3) and targets.shape == (6, 2)
    np.testing.assert_array_equal(targets[:3], targets[3:])
    originals = [np.asarray(v) for v in x / 255.0]
    for crop, copy in zip(images[:3], images[3:], strict=True):
        source = next(o for o in originals if np.allclose(o, crop, atol=1e-6))
        views = tta_views(source[np.newaxis])
        matches = [i for i, v in enumerate(views) if np.allclose(v[0], copy, atol=1e-6)]
        assert matches and matches != [0]  # one of the seven other views
    # the loss: cross-entropy of every image plus the weight times its pair's squared gap
    truth = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    predicted = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    per_image = np.asarray(consistency_loss(keras, 0.5)(truth, predicted))
    cross_entropy = -np.log(predicted[np.arange(4), [0, 1, 0, 1]])
    gaps = ((predicted[:2] - predicted[2:]) ** 2).sum(axis=1)
    np.testing.assert_allclose(per_image, cross_entropy + 0.5 * np.tile(gaps, 2), rtol=1e-5)
    # a real run trains with it, saves a model that loads, and records the weight
    from conftest import CNMC

    out = tmp_path / "run"
    tiny = ["--width", "0.0625", "--epochs", "1", "--folds", "3", "--batch-size", "8"]
    args = ["--data", str(CNMC), "--out", str(out), *tiny, "--per-patient", "4", "--quiet"]
    assert train.main([*args, "--consistency", "0.5", "--cache-dir", str(tmp_path)]) == 0
    assert TrainConfig.of_run(out).augmentation.consistency == 0.5
    assert keras.models.load_model(out / "model.keras", compile=False).count_params() > 0


def test_a_clean_view_teacher_is_shown_the_crop_before_augmentation(tmp_path):
    """``--distill-view clean``: the student sees the augmented crop, its target is the
    teacher's answer for the same crop before flips and photometric jitter (a double that
    answers with the mean brightness it was shown tells which); ``same`` shows the teacher
    the student's own crop."""
    import numpy as np

    from export.config import Augmentation

    def brightness_teacher(images, training=False):
        import tensorflow as tf

        mean = tf.reduce_mean(images, axis=[1, 2, 3])
        return tf.stack([mean, 1.0 - mean], axis=1)

    jitter = Augmentation(groups=("flips", "photometric"))
    for view in ("clean", "same"):
        x, images, targets = first_training_batch(
            tmp_path,
            jitter,
            8,
            teacher=brightness_teacher,
            distill_from="a teacher double",
            distill_weight=1.0,
            distill_view=view,
        )
        shown = targets[:, 0]
        student_seen = images.mean(axis=(1, 2, 3))
        clean = np.sort((x / 255.0).mean(axis=(1, 2, 3)))
        assert not np.allclose(np.sort(student_seen), clean, atol=1e-4)  # jitter acted
        if view == "clean":
            np.testing.assert_allclose(np.sort(shown), clean, atol=1e-5)
        else:
            np.testing.assert_allclose(shown, student_seen, atol=1e-5)
    with pytest.raises(ConfigError, match="needs --distill-from"):
        TrainConfig(tmp_path, tmp_path, distill_view="clean")
    with pytest.raises(ConfigError, match="without --mixup"):
        TrainConfig(
            tmp_path,
            tmp_path,
            augmentation=Augmentation(mixup=0.2),
            distill_from="t",
            distill_view="clean",
        )


def first_training_batch(
    tmp_path, augmentation, batch_size: int, crops: int = 8, teacher=None, **options
):
    """Random crops of alternating classes, and the first batch the TF pipeline makes of
    them for training with ``augmentation`` (and a distillation ``teacher``, with config
    ``options``)."""
    import numpy as np
    import tensorflow as tf

    from export.pipeline import make_dataset

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (crops, 128, 128, 3), dtype=np.uint8)
    y = np.arange(crops) % 2
    config = TrainConfig(
        data=tmp_path,
        out=tmp_path,
        augmentation=augmentation,
        schedule=Schedule(batch_size=batch_size),
        **options,
    )
    # TensorFlow's draws seeded here: the same batch whatever ran before in this process
    # (test order and workers vary; unseeded, a mixup share near 0 or 1 came out 1 run in 5)
    tf.random.set_seed(0)
    dataset = make_dataset(tf, x, y, 2, config, training=True, rng=rng, teacher=teacher)
    images, targets = (np.asarray(t) for t in next(iter(dataset)))
    return x, images, targets
