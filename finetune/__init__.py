"""finetune: two-phase transfer learning of keras.applications backbones, tracked in MLflow."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's C++ start-up chatter off the terminal
