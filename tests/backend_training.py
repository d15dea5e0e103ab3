"""A few training steps of either trainer on the fixture crops, for the TF-vs-JAX parity
test (``test_train_jax.py``): run with KERAS_BACKEND set, it writes the evaluated model's
probabilities (and, on TensorFlow, the initial weights the JAX run then starts from).

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
        np.savez(out / "initial.npz", *model.get_weights())
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
        with np.load(out / "initial.npz") as initial:
            trainer.start_from([initial[f"arr_{i}"] for i in range(len(initial.files))])
        key = jax.random.PRNGKey(0)
        for start in range(0, steps * BATCH, BATCH):
            trainer.train_step(images[start : start + BATCH], onehot[start : start + BATCH], key)
        probabilities = trainer.predict(trainer.evaluated_state(recalibration), x)
    np.save(out / f"{keras.backend.backend()}.npy", np.asarray(probabilities))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
