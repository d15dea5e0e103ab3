"""The customized VGG13 of the paper (and VGG16/19 built the same way for comparison)."""

from __future__ import annotations

import keras
from keras import layers

#: Convolutions per block for each depth; blocks 1-4 end in max-pooling, block 5 in averaging.
BLOCK_CONVS = {13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
BASE_WIDTHS = (64, 128, 256, 512, 512)
POOLINGS = ("global", "avg2")


def build_vgg(
    num_classes: int,
    *,
    depth: int = 13,
    width: float = 1.0,
    input_size: int = 128,
    pooling: str = "global",
    dense_units: tuple[int, ...] = (256, 128),
    batch_norm: bool = False,
    dropout: float = 0.3,
    initializer: str = "he_normal",
    name: str | None = None,
) -> keras.Model:
    """Build the network: widths 64-128-256-512-512 scaled by ``width``.

    ``pooling`` is the block-5 average pooling: ``global`` (global average) or ``avg2``
    (2x2 average pooling then flatten, as a plain VGG head would). He-normal initialisation
    is the default because without batch norm the Glorot default left the network stuck at
    chance from the start (measured on C-NMC, width 0.125).
    """
    if depth not in BLOCK_CONVS:
        raise ValueError(f"depth must be one of {sorted(BLOCK_CONVS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}")
    if num_classes < 2:
        raise ValueError("need at least two classes")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = inputs
    blocks = zip(BLOCK_CONVS[depth], BASE_WIDTHS, strict=True)
    for block, (convs, base) in enumerate(blocks, start=1):
        filters = max(4, int(round(base * width)))
        for index in range(1, convs + 1):
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=not batch_norm,
                kernel_initializer=initializer,
                name=f"block{block}_conv{index}",
            )(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{index}")(x)
            x = layers.ReLU(name=f"block{block}_relu{index}")(x)
        if block < 5:
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    if pooling == "global":
        x = layers.GlobalAveragePooling2D(name="block5_pool")(x)
    else:
        x = layers.AveragePooling2D(2, name="block5_pool")(x)
        x = layers.Flatten(name="flatten")(x)
    for index, units in enumerate(dense_units, start=1):
        x = layers.Dense(
            units, activation="relu", kernel_initializer=initializer, name=f"fc{index}"
        )(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"dropout{index}")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name or f"vgg{depth}_w{width:g}")
