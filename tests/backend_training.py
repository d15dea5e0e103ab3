"""A few training steps of either trainer on the fixture crops, for the TF-vs-JAX parity
test (``test_augment_parity.py``): run with KERAS_BACKEND set, it writes the evaluated
model's probabilities. Both start from the same weights drawn from one numpy seed, so the two
runs need nothing from each other and run side by side.

    KERAS_BACKEND=tensorflow python tests/backend_training.py OUT
    KERAS_BACKEND=jax python tests/backend_training.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.config import Augmentation, Network, Schedule, TrainConfig  # noqa: E402
from export.data import discover_dataset, load_arrays  # noqa: E402

BATCH = 8


def initial_weights(model) -> list[np.ndarray]:
    """The same start on either backend, drawn from one numpy seed as the network's own
    initialisers would (``export/vgg.py``): He-normal kernels, clipped at two standard
    deviations, and a Glorot-uniform output layer; biases and batch-norm parameters as Keras
    builds them (constants, the same on both)."""
    rng = np.random.default_rng(0)
    weights = model.get_weights()
    output = max(i for i, weight in enumerate(weights) if weight.ndim >= 2)
    started = []
    for index, weight in enumerate(weights):
        if weight.ndim >= 2:
            receptive = int(np.prod(weight.shape[:-2]))
            fan_in, fan_out = weight.shape[-2] * receptive, weight.shape[-1] * receptive
            if index == output:
                limit = np.sqrt(6 / (fan_in + fan_out))
                drawn = rng.uniform(-limit, limit, size=weight.shape)
            else:
                # as keras' truncated normal: sqrt(2 / fan_in) over the truncation's spread
                drawn = np.clip(rng.standard_normal(weight.shape), -2, 2)
                drawn *= np.sqrt(2 / fan_in) / 0.87962566103423978
            weight = drawn.astype(weight.dtype)
        started.append(weight)
    return started


def main(out: Path) -> None:
    import keras

    data = ROOT / "tests" / "fixtures" / "cnmc"
    config = TrainConfig(
        data=data,
        out=out,
        network=Network(width=0.0625, dropout=0.0),
        augmentation=Augmentation(groups=()),
        schedule=Schedule(epochs=1, batch_size=BATCH, lr=1e-3, ema=0.9),
    )
    samples = discover_dataset(data)
    labels = sorted({s.label for s in samples})
    x, kept = load_arrays(samples, config.recipe, workers=1)
    y = np.array([labels.index(samples[i].label) for i in kept])
    onehot = np.eye(len(labels), dtype=np.float32)[y]
    steps = len(x) // BATCH
    # batch norm re-estimated on 64 crops: one full batch on either trainer
    recalibration = x[np.arange(64) % len(x)]
    images = x.astype(np.float32) / 255.0
    if keras.backend.backend() == "tensorflow":
        from export.keras_utils import WeightAverage, compile_for_training, evaluated_weights

        keras.utils.set_random_seed(0)
        model = config.network.build(len(labels), config.recipe.input_size)
        model.set_weights(initial_weights(model))
        compile_for_training(keras, model, config.schedule, steps)
        average = WeightAverage(model, config.schedule)
        model.fit(
            images[: steps * BATCH],
            onehot[: steps * BATCH],
            batch_size=BATCH,
            shuffle=False,
            epochs=1,
            callbacks=[average.callback()],
            verbose=0,
        )
        model.set_weights(evaluated_weights(model, average, recalibration))
        probabilities = model.predict(images, verbose=0)
    else:
        import jax

        from export.train_jax import FoldTrainer

        trainer = FoldTrainer(config, len(labels), steps)
        trainer.start_from(initial_weights(trainer.model))
        key = jax.random.PRNGKey(0)
        for start in range(0, steps * BATCH, BATCH):
            trainer.train_step(images[start : start + BATCH], onehot[start : start + BATCH], key)
        probabilities = trainer.predict(trainer.evaluated_state(recalibration), x)
    np.save(out / f"{keras.backend.backend()}.npy", np.asarray(probabilities))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
