"""Classification metrics from a confusion matrix, and its figure."""

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted], int64."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(matrix: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class (0 where undefined)."""
    matrix = matrix.double()
    true_pos = matrix.diag()
    predicted = matrix.sum(0)
    actual = matrix.sum(1)
    rows = []
    for i, name in enumerate(classes):
        precision = (true_pos[i] / predicted[i]).item() if predicted[i] > 0 else 0.0
        recall = (true_pos[i] / actual[i]).item() if actual[i] > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        rows.append(dict(cls=name, precision=precision, recall=recall, f1=f1, support=int(actual[i].item())))
    return rows


def confusion_figure(matrix: torch.Tensor, classes: list[str], title: str = "confusion matrix"):
    """A matplotlib figure (Agg, no display needed) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(2 + 0.6 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        peak = matrix.max().item() or 1
        for t in range(n):
            for p in range(n):
                value = int(matrix[t, p])
                ax.text(
                    p,
                    t,
                    str(value),
                    ha="center",
                    va="center",
                    color="white" if value > peak / 2 else "black",
                    fontsize=8,
                )
    fig.tight_layout()
    return fig
