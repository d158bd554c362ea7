"""`--fine_tune_layers N`: train the head on a frozen module, then unfreeze the module's top N layers.

A TF Hub module is one SavedModel, not Keras layers, and `hub.KerasLayer(trainable=True)` makes
all of its variables trainable or none. What a TF2 module does list (the Reusable SavedModel
API, which Keras-built modules such as MobileNet's follow) is `trainable_variables`, in the order
its author built them: input to output. So a "layer" here is a variable's name less its last part
(`block_16_project_BN/gamma:0` -> `block_16_project_BN`), and the top N layers are the last N
such names in that order; `FineTunedHubLayer` reports only their variables as trainable.

Batch normalisation stays in inference mode (`training=False`), as transfer-learning practice
advises: small fine-tuning batches would replace the moving statistics the module learnt on
ImageNet, and the features the head was trained on would shift under it. Its gamma and beta,
when in the top N, are trained like any other weight.

The head-only stage is a run folder of its own (`<job_dir>/head`, run_folder.HEAD_STAGE_DIR), and
the fine-tuning stage warm-starts from its best weights, so each stage resumes on its own after
a crash; `--warm_start` a finished head-only run skips the first stage.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import tensorflow_hub as hub

from trainer import config as config_lib
from trainer.run_folder import HEAD_STAGE_DIR


class FineTuneError(ValueError):
    """The module cannot be fine-tuned as asked; the message names its layers or what it lacks."""


def layer_name(variable) -> str:
    """`a/b/kernel:0` -> `a/b`: the variables of one layer share everything before their last '/'."""
    name = variable.name.split(":")[0]
    return name.rsplit("/", 1)[0] if "/" in name else name


def top_layer_variables(trainable_variables, num_layers: int, handle: str) -> tuple[list, list[str]]:
    """(the variables of the last `num_layers` layers, those layers' names in order); ValueError if
    the module lists none or fewer layers."""
    order = []
    for v in trainable_variables:
        if layer_name(v) not in order:
            order.append(layer_name(v))
    if not order:
        raise FineTuneError(f"the TF Hub module {handle!r} lists no trainable_variables, so no layer of it can be "
                         f"unfrozen: --fine_tune_layers needs a TF2 module saved with them (a Keras model saved with "
                         f"tf.saved_model.save, or TF Hub's TF2 MobileNet); drop --fine_tune_layers to train the head")
    if num_layers > len(order):
        raise FineTuneError(f"--fine_tune_layers {num_layers}: the TF Hub module {handle!r} has {len(order)} layers with "
                         f"trainable variables (first {order[0]!r}, last {order[-1]!r})")
    top = set(order[-num_layers:])
    return [v for v in trainable_variables if layer_name(v) in top], order[-num_layers:]


class FineTunedHubLayer(hub.KerasLayer):
    """A TF Hub module whose top `num_layers` layers train; batch norm always in inference mode."""

    _unfrozen_refs = frozenset()  # set in __init__, after hub.KerasLayer has registered the module's weights

    def __init__(self, handle: str, num_layers: int, **kwargs):
        super().__init__(handle, trainable=True, **kwargs)
        self.num_layers = int(num_layers)
        unfrozen, names = top_layer_variables(list(getattr(self.resolved_object, "trainable_variables", [])),
                                              self.num_layers, handle)
        self._unfrozen_refs = frozenset(v.ref() for v in unfrozen)
        logging.info("fine-tuning %d of the module's layers (%d variables): %s ... %s", len(names), len(unfrozen),
                     names[0], names[-1])

    @property
    def trainable_weights(self):
        return [w for w in super().trainable_weights if w.ref() in self._unfrozen_refs]

    @property
    def non_trainable_weights(self):
        frozen = [w for w in super().trainable_weights if w.ref() not in self._unfrozen_refs]
        return frozen + super().non_trainable_weights

    def call(self, inputs, training=None):
        return super().call(inputs, training=False)  # batch-norm statistics stay the module's

    def get_config(self):
        return super().get_config() | {"num_layers": self.num_layers}


def check_module_layers(handle: str, num_layers: int) -> list[str]:
    """Loads the module and returns the names of its top `num_layers` layers; FineTuneError if it
    cannot be fine-tuned so (checked before the head-only stage trains, not after)."""
    try:
        module = hub.load(handle)
    except Exception as e:
        raise ValueError(f"cannot load the TF Hub module {handle!r} ({type(e).__name__}: {str(e)[:300]}); without "
                         f"network access pass a local SavedModel path with --hub_handle") from None
    return top_layer_variables(list(getattr(module, "trainable_variables", [])), num_layers, handle)[1]


def check_fine_tune(config: config_lib.TrainConfig, model_kind: str) -> None:
    """ValueError unless --fine_tune_layers can apply to this model."""
    if config.fine_tune_layers and model_kind != "mobilenet":
        raise ValueError(f"--fine_tune_layers {config.fine_tune_layers} unfreezes layers of the mobilenet model's "
                         f"TF Hub module; this run's model is {model_kind!r}: use --model mobilenet, or drop the flag")


def head_stage_config(config: config_lib.TrainConfig) -> config_lib.TrainConfig:
    """The first stage of a fine-tuning run: the same flags, the module frozen, in <job_dir>/head."""
    return dataclasses.replace(config, job_dir=os.path.join(config.job_dir, HEAD_STAGE_DIR), fine_tune_layers=0,
                               profile_batches="")


def stage_schedule(config: config_lib.TrainConfig) -> tuple[float, int]:
    """(learning rate, most epochs) of this run: the fine-tuning stage's when it unfreezes layers."""
    if config.fine_tune_layers:
        return config.fine_tune_lrate, config.fine_tune_epochs
    return config.lrate, config.num_epochs
