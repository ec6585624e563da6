"""resic_tf: Res-IC multi-exit character-level text classifiers for TensorFlow 2 / Keras 3.

Names are imported on first use (PEP 562), so `import resic_tf` and `resic --help` do not start
TensorFlow; `import resic_tf` followed by `keras.saving.load_model` still finds the registered
layers (Keras imports the module named in the saved config).
"""
import importlib as _importlib
import os as _os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) buries our messages; users can still
# set TF_CPP_MIN_LOG_LEVEL themselves before importing resic_tf.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.14.0"

_EXPORTS = {
    "ResICConfig": "resic_tf.config", "TrainConfig": "resic_tf.config",
    "ResICBackbone": "resic_tf.model", "ResICClassifier": "resic_tf.model",
    "build_model": "resic_tf.model", "build_backbone": "resic_tf.model",
    "exit_loss_weights": "resic_tf.model",
    "CBAM": "resic_tf.layers", "ResidualBlock": "resic_tf.layers",
    "InternalClassifier": "resic_tf.layers", "PaddingMask": "resic_tf.layers",
    "Stem": "resic_tf.layers", "SequenceConv1D": "resic_tf.layers",
    "NGramEmbedding": "resic_tf.layers", "ExitLoss": "resic_tf.losses",
    "TfidfNGrams": "resic_tf.tfidf", "LinearHead": "resic_tf.tfidf",
    "ResICPreprocessor": "resic_tf.preprocessor", "CharVocabulary": "resic_tf.vocabulary",
    "SparseMacroF1": "resic_tf.exit_metrics", "Run": "resic_tf.run",
    "LengthGate": "resic_tf.gate", "ExitPolicy": "resic_tf.policies",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resic_tf' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
