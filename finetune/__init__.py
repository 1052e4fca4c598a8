"""finetune: two-phase transfer learning of keras.applications backbones, tracked in MLflow."""

import os

TENSORFLOW_LOGS_ASKED = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3"  # the user asked for TensorFlow's logs
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's C++ start-up chatter off the terminal
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # nor MLflow's INFO lines (e.g. creating its tables)
