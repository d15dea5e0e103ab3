"""Keras helpers of the TensorFlow trainer: the weight average, batch-norm re-estimation,
saving without the optimizer, the training curves, and several input sets predicted at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.augment import consistency_loss
from export.config import Schedule
from smearscan.preprocess import unit_range


def plot_curves(history: list[dict], path: Path) -> None:
    """Training and validation loss and accuracy per epoch (the paper's Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history], label="train")
    ax_acc.plot(epochs, [h["accuracy"] for h in history], label="train")
    if history and history[0].get("val_loss") is not None:
        ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
        ax_acc.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
        ax_acc.plot(epochs, [h["val_weighted_f1"] for h in history], label="validation weighted F1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class WeightAverage:
    """Exponential moving average of the trainable weights, updated after every step.

    The averaged weights are what gets evaluated and saved: they swing far less from epoch
    to epoch than the raw weights under strong augmentation. The decay per step is
    :meth:`export.config.Schedule.ema_decay`, as in the JAX trainer.
    """

    def __init__(self, model, schedule: Schedule) -> None:
        self.model, self.schedule, self.steps = model, schedule, 0
        self.shadow = [np.array(v.numpy()) for v in model.trainable_weights]

    def callback(self):
        import keras

        average = self

        class Update(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                average.update()

        return Update()

    def update(self) -> None:
        self.steps += 1
        decay = self.schedule.ema_decay(self.steps)
        for shadow, variable in zip(self.shadow, self.model.trainable_weights, strict=True):
            shadow *= decay
            shadow += (1 - decay) * variable.numpy()

    def apply(self) -> None:
        for shadow, variable in zip(self.shadow, self.model.trainable_weights, strict=True):
            variable.assign(shadow)


def recalibrate_batch_norm(model, images: np.ndarray, batch_size: int = 64) -> None:
    """Replace every batch-norm layer's moving statistics by their average over ``images``
    (un-augmented training crops, uint8): a cumulative mean, batch by batch
    (:meth:`export.config.Schedule.recalibration_momentum`, as in the JAX trainer)."""
    import keras

    layers = [
        layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers or len(images) == 0:
        return
    momenta = [layer.momentum for layer in layers]
    try:
        for index, start in enumerate(range(0, len(images), batch_size)):
            for layer in layers:
                layer.momentum = Schedule.recalibration_momentum(index)
            batch = unit_range(images[start : start + batch_size])
            model(batch, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum


def compile_for_training(
    keras, model, schedule: Schedule, steps_per_epoch: int, consistency: float = 0.0
) -> None:
    """Adam on the schedule's learning rate, cross-entropy on one-hot (or soft) targets:
    the TF trainer's optimisation, as the JAX trainer's ``FoldTrainer`` sets it up. A
    ``consistency`` weight adds the rotation-consistency term (its batches come in pairs)."""
    model.compile(
        optimizer=keras.optimizers.Adam(schedule.learning_rate(keras, steps_per_epoch)),
        loss=consistency_loss(keras, consistency) if consistency else "categorical_crossentropy",
        metrics=["accuracy"],
    )
    # The optimizer's slots and the loss and metric trackers are built here, eagerly, not
    # inside the first traced train step: Keras on TensorFlow without a distribution strategy
    # builds them there, and a tf.function that creates variables is traced twice.
    model.optimizer.build(model.trainable_variables)
    x = np.zeros((2, *model.input_shape[1:]), np.float32)  # a pair, for the consistency loss
    y_pred = model(x, training=False)
    y = np.zeros(y_pred.shape, np.float32)
    model.compute_loss(x=x, y=y, y_pred=y_pred)
    model.compute_metrics(x, y, y_pred, sample_weight=None)
    model.reset_metrics()


def evaluated_weights(
    model, average: WeightAverage | None, recalibration: np.ndarray
) -> list[np.ndarray]:
    """The model as it is evaluated and saved (the weight average, batch norm re-estimated
    on ``recalibration``), leaving the model's own training weights as they were."""
    raw = [np.array(w.numpy()) for w in model.weights]
    if average:
        average.apply()
    recalibrate_batch_norm(model, recalibration)
    final = [np.array(w.numpy()) for w in model.weights]
    for variable, value in zip(model.weights, raw, strict=True):
        variable.assign(value)
    return final


def all_layers(model) -> list:
    """Every layer, inside nested models too (an ensemble holds its members as layers)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(all_layers(layer))
    return found


def save_model(model, path: Path) -> None:
    """The weights and architecture without the optimizer state (a third of the size), so
    runs can be kept in the repository and fine-tuned from. Rebuilt from its config, not
    cloned: a clone is compiled again, which a custom loss (``--consistency``) cannot be."""
    bare = type(model).from_config(model.get_config())
    bare.set_weights(model.get_weights())
    bare.save(path)


def predict_sets(model, sets: list[np.ndarray], batch_size: int = 128) -> list[np.ndarray]:
    """The model's outputs on several sets of uint8 inputs, in one ``predict`` call: each
    call builds and traces its own input pipeline (about a quarter of a second), which cost
    the shift suite and the rotation report more than their small sets' compute."""
    if not sets:
        return []
    outputs = model.predict(unit_range(np.concatenate(sets)), batch_size=batch_size, verbose=0)
    return np.split(np.asarray(outputs), np.cumsum([len(s) for s in sets])[:-1])
