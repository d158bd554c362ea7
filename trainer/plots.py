"""The training-curve figure: loss and accuracy per epoch, training and validation (the book's figure 7-4)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(history: dict[str, list[float]], path: str, title: str = "") -> str:
    """Writes a PNG with two panels (loss, accuracy); `history` is Keras's History.history shape."""
    epochs = range(1, len(history.get("loss", [])) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), ("val_" + metric, "--")):
            if history.get(key):
                ax.plot(epochs, history[key], style, marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, parse_math=False)  # the data folder's name: a '$' in it would start a mathtext formula
    fig.tight_layout()
    import tensorflow as tf  # gfile: the job folder may be gs://

    with tf.io.gfile.GFile(path, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
    return path
