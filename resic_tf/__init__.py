"""resic_tf: Res-IC multi-exit character-level text classifiers for TensorFlow 2 / Keras 3."""
import os as _os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) buries our messages; users can still
# set TF_CPP_MIN_LOG_LEVEL themselves before importing resic_tf.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from resic_tf.config import ResICConfig
from resic_tf.layers import CBAM, InternalClassifier, ResidualBlock
from resic_tf.model import (ResICBackbone, ResICClassifier, build_backbone, build_model,
                            exit_loss_weights)
from resic_tf.vocabulary import CharEncoder, CharVocabulary

__version__ = "0.1.0"
__all__ = ["ResICConfig", "ResICBackbone", "ResICClassifier", "build_model", "build_backbone",
           "exit_loss_weights", "CBAM", "ResidualBlock", "InternalClassifier", "CharEncoder",
           "CharVocabulary", "__version__"]
