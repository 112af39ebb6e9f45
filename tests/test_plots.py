"""The figures (tinynet.plots) are readable: no legend over the bars, numbers large enough, whole epochs."""
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from tinynet import plots
from tinynet.train import EpochStats, History


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """``draw(plot, *args)``: the Figure that ``plot`` would save, laid out as it is saved."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))

    def draw(plot, *args, **kwargs):
        plot(*args, tmp_path / "figure.png", **kwargs)
        fig = figures.pop()
        FigureCanvasAgg(fig).draw()
        return fig
    return draw


def test_class_distribution_legend_covers_no_bar(drawn):
    """Before: the legend ("best" place) lay over the bars of the last classes when all are equally tall."""
    k = 10
    labels = np.repeat(np.arange(k), 20)
    fig = drawn(plots.plot_class_distribution, {"train": labels, "validation": labels[::4]}, [str(c) for c in range(k)])
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in ax.patches]
    assert len(bars) == 2 * k
    overlapping = [i for i, bar in enumerate(bars) if legend.overlaps(bar)]
    assert not overlapping, f"the legend covers bars {overlapping}"


@pytest.mark.parametrize("k", [30, 50])
def test_confusion_matrix_numbers_stay_readable_with_many_classes(drawn, k):
    """Before: 6 pt numbers in cells that shrank with the class count, and no numbers at all beyond 25 classes."""
    matrix = np.random.default_rng(0).integers(0, 1000, size=(k, k))
    fig = drawn(plots.plot_confusion_matrix, matrix, [f"class {c}" for c in range(k)])
    ax = fig.axes[0]
    numbers = [text for text in ax.texts]
    assert len(numbers) == k * k and {t.get_text() for t in numbers} >= {str(matrix[0, 0]), str(matrix[-1, -1])}
    assert min(t.get_fontsize() for t in numbers) >= 8
    box = ax.get_window_extent()
    cell_inches = min(box.width, box.height) / fig.dpi / k
    assert cell_inches >= 0.35, cell_inches
    # every number fits inside its cell
    widest = max(t.get_window_extent().width for t in numbers) / fig.dpi
    assert widest < cell_inches


def test_confusion_matrix_of_many_classes_stays_a_sane_size(drawn):
    """Beyond what can be annotated, the cells shrink so that the figure stays a figure, not a poster."""
    k = 188
    fig = drawn(plots.plot_confusion_matrix, np.eye(k, dtype=int), [f"n{c:08d}" for c in range(k)])
    assert max(fig.get_size_inches()) <= 30 and not fig.axes[0].texts


def test_curves_of_a_short_run_have_whole_epoch_ticks(drawn):
    """Before: a 2-epoch run's epoch axis read 1.00, 1.25, 1.50, ..."""
    history = History([EpochStats(1, 1.0, 0.5, 1.1, 0.4, 2.0, 50.0, 1e-3),
                       EpochStats(2, 0.8, 0.6, 1.0, 0.5, 2.0, 50.0, 1e-3)])
    fig = drawn(plots.plot_curves, history)
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        labels = [label.get_text() for label in ax.get_xticklabels() if label.get_text()]
        assert labels and all(label.lstrip("−-").isdigit() for label in labels), labels
