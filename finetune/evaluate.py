"""Test-split evaluation: accuracy, top-k, per-class report, confusion matrix and training curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, top_k_accuracy_score  # noqa: E402


@dataclass
class Evaluation:
    """Test metrics, with the per-class report as text and as a dict."""

    top_k: int
    top_k_accuracy: float
    report_text: str
    report: dict
    y_true: np.ndarray
    y_pred: np.ndarray

    @property
    def correct(self) -> int:
        """How many images were classified right."""
        return int(np.sum(self.y_true == self.y_pred))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.y_true == self.y_pred))


def effective_top_k(top_k: int, num_classes: int) -> int:
    """Top-k is only informative below the number of classes."""
    return max(1, min(top_k, num_classes - 1))


def predict_split(model: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """True labels and predicted probabilities for a (images, one-hot) dataset."""
    y_true = np.concatenate([np.argmax(y, axis=-1) for _, y in ds.as_numpy_iterator()])
    probabilities = model.predict(ds, verbose=0)
    return y_true, probabilities


def evaluate(model: keras.Model, ds: tf.data.Dataset, class_names: list[str], top_k: int) -> Evaluation:
    """Score the model on a split with scikit-learn's metrics."""
    y_true, probabilities = predict_split(model, ds)
    y_pred = probabilities.argmax(axis=-1)
    labels = np.arange(len(class_names))
    k = effective_top_k(top_k, len(class_names))
    kwargs = dict(labels=labels, target_names=class_names, zero_division=0)
    return Evaluation(
        top_k=k,
        top_k_accuracy=float(top_k_accuracy_score(y_true, probabilities, k=k, labels=labels)),
        report_text=classification_report(y_true, y_pred, digits=3, **kwargs),
        report=classification_report(y_true, y_pred, output_dict=True, **kwargs),
        y_true=y_true,
        y_pred=y_pred,
    )


def save_confusion_matrix(evaluation: Evaluation, class_names: list[str], path: Path) -> None:
    """Confusion matrix of the test split as a PNG."""
    size = max(5, 0.6 * len(class_names) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        evaluation.y_true,
        evaluation.y_pred,
        labels=np.arange(len(class_names)),
        display_labels=class_names,
        xticks_rotation=45,
        colorbar=False,
        ax=ax,
    )
    ax.set_title(f"Test confusion matrix (accuracy {evaluation.accuracy:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_training_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch for train and val, with the phase-2 start marked."""
    epochs = [rec["epoch"] for rec in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            ax.plot(epochs, [rec.get(prefix + metric, np.nan) for rec in history], style, marker="o", label=prefix + metric)
        phase2 = [rec["epoch"] for rec in history if rec["phase"] == 2]
        if phase2:
            ax.axvline(min(phase2) - 0.5, color="grey", linestyle=":", label="phase 2 starts")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
