import numpy as np
import pytest

from smearscan.metrics import (
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    roc_auc,
    roc_curve,
)


def test_confusion_matrix_counts():
    truth, called = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    assert confusion_matrix(truth, called, 2).tolist() == [[1, 1], [1, 2]]


def test_binary_metrics_against_hand_computed_values():
    # labels: 0 = all (positive), 1 = hem
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p_all = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1])
    probabilities = np.stack([p_all, 1 - p_all], axis=1)
    m = classification_metrics(y, probabilities, ["all", "hem"], positive="all")
    # predictions: all all all hem | all hem hem  -> TP 3, FN 1, FP 1, TN 2
    assert m["confusion_matrix"] == [[3, 1], [1, 2]]
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 7)
    f1_all = 2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4)
    f1_hem = 2 * (2 / 3) * (2 / 3) / (2 / 3 + 2 / 3)
    assert m["weighted_f1"] == pytest.approx((4 * f1_all + 3 * f1_hem) / 7)
    # AUC: 12 positive-negative pairs; pairs ranked right: 0.9,0.8 beat all 3; 0.6 beats 2;
    # 0.3 beats 2 -> 3+3+2+2 = 10
    assert m["roc_auc"] == pytest.approx(10 / 12)


def test_auc_ties_count_half_and_degenerate_is_nan():
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_three_classes():
    y = np.array([0, 1, 2, 2])
    probabilities = np.eye(3)[[0, 1, 2, 1]]
    m = classification_metrics(y, probabilities, ["a", "b", "c"], positive="c")
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)


def test_calibration_error():
    probabilities = np.array([[0.9, 0.1]] * 10)
    y = np.array([0] * 9 + [1])
    assert expected_calibration_error(y, probabilities) == pytest.approx(0.0)
    y_bad = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(y_bad, probabilities) == pytest.approx(0.4)


@pytest.mark.train
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn_on_random_data(seed):
    from conftest import require_training_stack

    require_training_stack()
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    classes = 2 + seed % 2
    y = rng.integers(0, classes, 300)
    probabilities = rng.dirichlet(np.ones(classes), 300)
    predicted = probabilities.argmax(axis=1)
    labels = [f"c{i}" for i in range(classes)]
    ours = classification_metrics(y, probabilities, labels, "c0")
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, predicted))
    assert ours["weighted_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y, predicted, average="weighted")
    )
    assert ours["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y, predicted, average="macro")
    )
    assert ours["confusion_matrix"] == sklearn_metrics.confusion_matrix(y, predicted).tolist()
    assert ours["sensitivity"] == pytest.approx(
        sklearn_metrics.recall_score(y == 0, predicted == 0)
    )
    assert ours["roc_auc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(y == 0, probabilities[:, 0])
    )
    fpr, tpr = roc_curve(y == 0, probabilities[:, 0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(ours["roc_auc"])


def test_wilson_intervals_match_the_published_formula():
    from smearscan.metrics import wilson_interval

    assert wilson_interval(10, 12) == pytest.approx([0.5520, 0.9530], abs=1e-4)
    assert wilson_interval(0, 5) == pytest.approx([0.0, 0.4345], abs=1e-4)  # never below 0
    everything = wilson_interval(5, 5)
    assert everything is not None and everything[1] == 1.0
    assert wilson_interval(0, 0) is None
