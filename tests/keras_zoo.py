"""Tiny Keras models whose dead, dormant and gradient-dead units are known by construction.

A unit with zero incoming weights and bias -1 has pre-activation -1 everywhere: dead (and dormant, and
gradient-dead, since ReLU's slope is 0 there). A unit with zero incoming weights and bias +1 always fires; with zero
outgoing weights it is alive but gradient-dead. Every other unit has random weights and fires on some of 64 random
samples with overwhelming probability.

Each builder returns a `ZooModel`: the model, inputs to scan, and the expected sites in order of first execution.
Importing this module imports Keras.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import layers


@dataclass
class Expect:
    kind: str
    units: int
    unit_axis: int
    dead: list[int]
    grad_dead: list[int]
    dormant: list[int] | None = None  # None: the same as dead (ReLU family)

    @property
    def dormant_units(self) -> list[int]:
        return self.dead if self.dormant is None else self.dormant


@dataclass
class ZooModel:
    model: Any
    x: np.ndarray
    sites: dict[str, Expect] = field(default_factory=dict)


def _inputs(shape: tuple[int, ...], n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype("float32")


def _set(variable: Any, edit: Any) -> None:
    value = keras.ops.convert_to_numpy(variable.value).copy()
    edit(value)
    variable.assign(value)


def force_units(
    layer: Any, *, dead: tuple[int, ...] = (), alive: tuple[int, ...] = (), positive: bool = False
) -> None:
    """Zero the incoming weights of `dead` and `alive` units (last kernel axis); bias -1 kills, +1 keeps firing.

    `positive=True` makes the other units' weights nonnegative: for a layer fed by rectified (mostly nonnegative)
    outputs, random signed weights can leave a unit negative on every sample by chance; nonnegative ones cannot.
    """
    units = list(dead) + list(alive)

    def zero(kernel: np.ndarray) -> None:
        if positive:
            np.abs(kernel, out=kernel)
        kernel[..., units] = 0.0

    def bias(value: np.ndarray) -> None:
        value[list(dead)] = -1.0
        value[list(alive)] = 1.0

    _set(layer.kernel, zero)
    _set(layer.bias, bias)


def cut_outgoing(layer: Any, units: tuple[int, ...]) -> None:
    """Zero the weights that carry `units` of the previous site into `layer` (the kernel's input-channel axis)."""

    def zero(kernel: np.ndarray) -> None:
        kernel[..., list(units), :] = 0.0

    _set(layer.kernel, zero)


def sequential_mlp() -> ZooModel:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            layers.Dense(16, activation="relu", name="dense_relu"),
            layers.Dense(12, name="hidden"),
            layers.ReLU(name="relu_layer"),
            layers.Dense(4, name="out"),
        ],
        name="mlp",
    )
    force_units(model.get_layer("dense_relu"), dead=(3, 7), alive=(10,))
    cut_outgoing(model.get_layer("hidden"), (10,))
    force_units(model.get_layer("hidden"), dead=(2,), alive=(5,), positive=True)
    cut_outgoing(model.get_layer("out"), (5,))
    return ZooModel(
        model,
        _inputs((8,)),
        {
            "dense_relu": Expect("relu", 16, 1, [3, 7], [3, 7, 10]),
            "relu_layer": Expect("relu", 12, 1, [2], [2, 5]),
        },
    )


def functional_cnn() -> ZooModel:
    """A fused conv relu, an Activation layer and a raw `keras.ops.relu` in one Functional graph."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.Conv2D(5, 3, padding="same", name="conv2")(x)
    x = layers.Activation("relu", name="act")(x)
    x = layers.Conv2D(4, 1, name="conv3")(x)
    x = keras.ops.relu(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="cnn")
    force_units(model.get_layer("conv"), dead=(1,), alive=(4,))
    cut_outgoing(model.get_layer("conv2"), (4,))
    force_units(model.get_layer("conv2"), dead=(0,), alive=(3,), positive=True)
    cut_outgoing(model.get_layer("conv3"), (3,))
    force_units(model.get_layer("conv3"), dead=(2,), alive=(1,), positive=True)
    cut_outgoing(model.get_layer("logits"), (1,))
    raw = [op for op in model.operations if not isinstance(op, layers.Layer)]
    return ZooModel(
        model,
        _inputs((8, 8, 3)),
        {
            "conv": Expect("relu", 6, 3, [1], [1, 4]),
            "act": Expect("relu", 5, 3, [0], [0, 3]),
            raw[0].name: Expect("relu", 4, 3, [2], [1, 2]),
        },
    )


def nested() -> ZooModel:
    """A Sequential inside a Functional model, and a ReLU layer called twice (`shared`, `shared#2`)."""
    keras.utils.set_random_seed(0)
    block = keras.Sequential([keras.Input((6,)), layers.Dense(10, activation="relu", name="inner_dense")], name="block")
    shared = layers.ReLU(name="shared")
    inputs = keras.Input((6,))
    x = shared(block(inputs))
    x = layers.Dense(8, name="mid")(x)
    x = shared(x)
    outputs = layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs, name="nested")
    force_units(block.get_layer("inner_dense"), dead=(4,), alive=(7,))
    cut_outgoing(model.get_layer("mid"), (7,))
    force_units(model.get_layer("mid"), dead=(3,), alive=(6,), positive=True)
    cut_outgoing(model.get_layer("head"), (6,))
    return ZooModel(
        model,
        _inputs((6,)),
        {
            "block/inner_dense": Expect("relu", 10, 1, [4], [4, 7]),
            # shared's input is inner_dense's output: unit 4 is 0 there, and relu'(0) = 0
            "shared": Expect("relu", 10, 1, [4], [4, 7]),
            "shared#2": Expect("relu", 8, 1, [3], [3, 6]),
        },
    )


class Block(keras.layers.Layer):
    """A plain Layer holding sub-layers: its sites are named "block/act"."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d2 = layers.Dense(8, name="d2")
        self.act = layers.ReLU(name="act")

    def call(self, x: Any) -> Any:
        return self.act(self.d2(x))


class Subclassed(keras.Model):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d1 = layers.Dense(12, activation="relu", name="d1")
        self.block = Block(name="block")
        self.head = layers.Dense(3, name="head")

    def call(self, x: Any) -> Any:
        return self.head(self.block(self.d1(x)))


def subclassed() -> ZooModel:
    keras.utils.set_random_seed(0)
    model = Subclassed(name="subclassed")
    x = _inputs((5,))
    model(x[:2])
    force_units(model.d1, dead=(0,), alive=(5,))
    cut_outgoing(model.block.d2, (5,))
    force_units(model.block.d2, dead=(2,), alive=(6,), positive=True)
    cut_outgoing(model.head, (6,))
    return ZooModel(
        model,
        x,
        {
            "d1": Expect("relu", 12, 1, [0], [0, 5]),
            "block/act": Expect("relu", 8, 1, [2], [2, 6]),
        },
    )


def channels_first() -> ZooModel:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 8, 8))
    x = layers.Conv2D(4, 3, data_format="channels_first", activation="relu", name="conv_cf")(inputs)
    x = layers.Conv2D(3, 1, data_format="channels_first", name="conv_cf2")(x)
    x = layers.ReLU(name="relu_cf")(x)
    x = layers.Flatten(data_format="channels_first")(x)
    outputs = layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs, name="channels_first")
    force_units(model.get_layer("conv_cf"), dead=(2,))
    force_units(model.get_layer("conv_cf2"), dead=(1,), positive=True)
    return ZooModel(
        model,
        _inputs((3, 8, 8)),
        {
            "conv_cf": Expect("relu", 4, 1, [2], [2]),
            "relu_cf": Expect("relu", 3, 1, [1], [1]),
        },
    )


def kinds() -> ZooModel:
    """One of each watched kind; a unit forced to z = -1 is dormant everywhere but dead only under the ReLU family."""
    from deadneuron.keras import SineReLU

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5, name="d_leaky"),
            layers.LeakyReLU(negative_slope=0.1, name="leaky"),
            layers.Dense(5, name="d_elu"),
            layers.ELU(name="elu"),
            layers.Dense(5, name="d_prelu"),
            layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), name="prelu"),
            layers.Dense(5, name="d_sine"),
            SineReLU(name="sine"),
            layers.Dense(5, activation=SineReLU(epsilon=0.025), name="d_fused_sine"),
            layers.Dense(5, activation="relu6", name="d_relu6"),
            layers.Dense(5, activation="gelu", name="d_gelu"),
            layers.Dense(5, activation="tanh", name="d_tanh"),
            layers.Dense(3, name="d_out"),
            layers.Softmax(name="softmax"),
        ],
        name="kinds",
    )
    for name in ("d_leaky", "d_elu", "d_prelu", "d_sine", "d_fused_sine", "d_relu6", "d_gelu"):
        force_units(model.get_layer(name), dead=(1,), positive=name != "d_leaky")
    return ZooModel(
        model,
        _inputs((6,)),
        {
            "leaky": Expect("leaky_relu", 5, 1, [], [], dormant=[1]),
            "elu": Expect("elu", 5, 1, [], [], dormant=[1]),
            "prelu": Expect("prelu", 5, 1, [], [], dormant=[1]),
            "sine": Expect("sinerelu", 5, 1, [], [], dormant=[1]),
            "d_fused_sine": Expect("sinerelu", 5, 1, [], [], dormant=[1]),
            "d_relu6": Expect("relu6", 5, 1, [1], [1]),
            "d_gelu": Expect("gelu", 5, 1, [], [], dormant=[1]),
        },
    )


BUILDERS = {
    "mlp": sequential_mlp,
    "cnn": functional_cnn,
    "nested": nested,
    "subclassed": subclassed,
    "channels_first": channels_first,
    "kinds": kinds,
}
