"""The embedding distance: how unlike the training crops a crop looks to the network itself.

Quality control's simple measures (size, colour, brightness, focus, hue) miss inputs that
look ordinary to them but not to the model. The network's penultimate layer (the input of
its softmax layer; the members' concatenated for an averaged ensemble) is whitened on the
training crops: the mean removed, the top principal components scaled to unit variance,
and everything outside them scaled together as one more component. A crop's distance is
the mean square of those components, about 1 for training crops. The exported graph
computes it as a second output, :data:`smearscan.qc.EMBEDDING_OUTPUT`, so the scanner
needs nothing but the model file; its limits are fitted like the other QC limits
(:func:`smearscan.qc.fit_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smearscan.qc import EMBEDDING_OUTPUT

#: Principal components kept apart (on C-NMC's 128-unit layer they hold 98 % of the
#: variance; the rest is one more component).
COMPONENTS = 8
#: The layer whose input is the embedding (every smearscan network's softmax layer).
HEAD = "probabilities"


@dataclass(frozen=True)
class Whitening:
    """What turns an embedding into its distance: fitted on training crops."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (D, K) orthonormal columns
    variances: np.ndarray  # (K,)
    residual_variance: float  # summed variance outside the K components

    @classmethod
    def fit(cls, embeddings: np.ndarray, components: int = COMPONENTS) -> Whitening:
        values = np.asarray(embeddings, np.float64)
        if values.ndim != 2 or len(values) < 2:
            raise ValueError("need at least two embeddings to whiten")
        mean = values.mean(axis=0)
        _, singular, rows = np.linalg.svd(values - mean, full_matrices=False)
        variances = singular**2 / (len(values) - 1)
        k = max(1, min(components, len(variances) - 1))
        floor = max(float(variances[0]) * 1e-9, 1e-12)  # dead units: no division by zero
        return cls(
            mean=mean,
            basis=rows[:k].T,
            variances=np.maximum(variances[:k], floor),
            residual_variance=max(float(variances[k:].sum()), floor),
        )

    @property
    def method(self) -> str:
        k = len(self.variances)
        return (
            f"penultimate-layer embedding, whitened on the training crops: mean square of its "
            f"top {k} principal components (unit variance) and of the rest as one component"
        )

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """The distance of each embedding, in numpy (the graph computes the same)."""
        centred = np.asarray(embeddings, np.float64) - self.mean
        projected = centred @ self.basis
        residual = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0)
        explained = (projected**2 / self.variances).sum(axis=1)
        return (explained + residual / self.residual_variance) / (len(self.variances) + 1)


def members_of(model) -> list:
    """The networks of a model: an averaged ensemble's members, or the model itself."""
    import keras

    from export.to_onnx import ENSEMBLE_PREFIX

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested if model.name.startswith(ENSEMBLE_PREFIX) and nested else [model]


def _with_embedding(member, index: int):
    """A member returning its probabilities and its penultimate embedding."""
    import keras

    try:
        head = member.get_layer(HEAD)
    except ValueError:
        raise ValueError(f"{member.name} has no {HEAD!r} layer: no embedding to measure") from None
    return keras.Model(member.input, [member.output, head.input], name=f"embedded_{index}")


def embedding_model(members: list, input_size: int):
    """Keras: crops -> (averaged probabilities, concatenated embeddings)."""
    import keras

    inputs = keras.Input((input_size, input_size, 3), name="image")
    answers = [_with_embedding(member, i)(inputs) for i, member in enumerate(members)]
    probabilities = [p for p, _ in answers]
    embeddings = [e for _, e in answers]
    averaged = (
        keras.layers.Average(name="probabilities")(probabilities)
        if len(members) > 1
        else probabilities[0]
    )
    joined = embeddings[0]
    if len(members) > 1:
        joined = keras.layers.Concatenate(name="embedding")(embeddings)
    return keras.Model(inputs, [averaged, joined], name="embedded")


def _distance_layer(whitening: Whitening):
    import keras
    from keras import ops

    class EmbeddingDistance(keras.layers.Layer):
        """The whitened distance of an embedding (:meth:`Whitening.distances`), float32."""

        def call(self, embedding):
            centred = embedding - whitening.mean.astype(np.float32)
            projected = ops.matmul(centred, whitening.basis.astype(np.float32))
            total = ops.sum(ops.square(centred), axis=-1)
            kept = ops.sum(ops.square(projected), axis=-1)
            scale = (1.0 / whitening.variances).astype(np.float32)
            explained = ops.sum(ops.square(projected) * scale, axis=-1)
            residual = ops.maximum(total - kept, 0.0) / np.float32(whitening.residual_variance)
            return (explained + residual) / np.float32(len(whitening.variances) + 1)

    return EmbeddingDistance(name=EMBEDDING_OUTPUT)


def with_distance(members: list, input_size: int, whitening: Whitening):
    """Keras: crops -> (averaged probabilities, embedding distance): what is exported."""
    import keras

    embedded = embedding_model(members, input_size)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    probabilities, embedding = embedded(inputs)
    probabilities = keras.layers.Identity(name="probabilities")(probabilities)
    distance = _distance_layer(whitening)(embedding)
    return keras.Model(inputs, [probabilities, distance], name=embedded.name)


def embeddings_of(members: list, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The concatenated embeddings of model inputs (float32 in [0, 1])."""
    model = embedding_model(members, images.shape[1])
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0)[1], np.float64)
