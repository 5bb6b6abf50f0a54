"""The segmentation judge of paired samples: the segmenter, its seeded training, Dice, the report.

Everything runs on tiny blob slices whose masks are threshold bands of the image
(`conftest.blob_masks`), so a segmenter can learn the rule in a few dozen steps, and pairs
whose masks break the rule must score clearly lower.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blob_images, blob_masks

from oasis_ldm.models.segmenter import Segmenter
from oasis_ldm.segmentation import (
    FOREGROUND,
    SegmenterTraining,
    pairwise_dice,
    predict,
    segmentation_report,
    split_dice,
    spread_rows,
    train_segmenter,
)

SIZE = 16
FAST = SegmenterTraining(steps=100, batch_size=8, lr=1e-2, widths=(8, 16))  # ~1.5 s a report


@pytest.fixture(autouse=True)
def one_thread():
    """Tests share 2 cores with other processes; and the thread count is part of determinism."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, SIZE, SIZE) blob slices and their band masks."""
    images = blob_images(n, SIZE, seed=seed)
    return torch.from_numpy(images)[:, None], torch.from_numpy(blob_masks(images))[:, None]


def test_segmenter_shapes() -> None:
    model = Segmenter(widths=(8, 16, 32))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4, 32, 32)
    assert model(torch.zeros(1, 1, 16, 24)).shape == (1, 4, 16, 24)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 1, 18, 18))
    with pytest.raises(ValueError, match="at least two widths"):
        Segmenter(widths=(8,))


def test_segmenter_is_per_sample() -> None:
    """GroupNorm only: a slice's logits do not depend on the rest of its batch."""
    model = Segmenter(widths=(8, 16)).eval()
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_training_is_deterministic_for_a_seed() -> None:
    images, masks = pairs(12, seed=0)
    settings = SegmenterTraining(steps=5, batch_size=4, widths=(8, 16))
    runs = [train_segmenter(images, masks, settings=settings, seed=s, progress=False) for s in (3, 3, 4)]
    first, again, other = (m.state_dict() for m in runs)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert any(not torch.equal(first[n], other[n]) for n in first if first[n].is_floating_point())
    assert torch.equal(predict(runs[0], images), predict(runs[1], images))


def test_training_leaves_the_global_rng_alone() -> None:
    images, masks = pairs(4, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_segmenter(images, masks, settings=SegmenterTraining(steps=1, batch_size=2, widths=(8, 16)), progress=False)
    assert torch.equal(torch.rand(3), expected)


def hand_dice(pred: np.ndarray, target: np.ndarray, label: int) -> float:
    p, t = pred == label, target == label
    return 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def test_dice_matches_a_hand_computation() -> None:
    # Two 2x4 label maps. Image 0 has no white matter in either map; image 1 has all classes.
    target = torch.tensor([[[0, 1, 1, 2], [0, 2, 2, 2]], [[0, 1, 2, 3], [3, 3, 3, 0]]])
    pred = torch.tensor([[[0, 1, 2, 2], [0, 2, 2, 0]], [[1, 1, 2, 3], [3, 3, 0, 0]]])
    # Pooled over both images, counted by hand (intersection, predicted, target):
    # CSF (2, 3, 3) -> 4/6, grey matter (4, 5, 5) -> 8/10, white matter (3, 3, 4) -> 6/7.
    pooled = split_dice(pred, target)
    assert pooled == pytest.approx({"csf": 2 / 3, "grey_matter": 4 / 5, "white_matter": 6 / 7})
    t, p = target.numpy(), pred.numpy()
    assert pooled == pytest.approx({name: hand_dice(p, t, k + 1) for k, name in enumerate(FOREGROUND)})
    # Per image, over the classes present in either map: image 0 has no white matter to score.
    image0 = (2 / 3 + 3 / 4) / 2  # CSF (1, 1, 2), grey matter (3, 4, 4)
    image1 = (2 / 3 + 1 + 6 / 7) / 3  # CSF (1, 2, 1), grey matter (1, 1, 1), white matter (3, 3, 4)
    assert image0 == pytest.approx(np.mean([hand_dice(p[0], t[0], k) for k in (1, 2)]))
    assert image1 == pytest.approx(np.mean([hand_dice(p[1], t[1], k) for k in (1, 2, 3)]))
    assert pairwise_dice(pred, target) == pytest.approx((image0 + image1) / 2)


def test_pairwise_dice_skips_empty_slices() -> None:
    target = torch.zeros(2, 2, 2, dtype=torch.long)
    target[1, 0, 0] = 1
    pred = target.clone()
    assert pairwise_dice(pred, target) == pytest.approx(1.0)  # slice 0, all background in both, is left out


def test_spread_rows_spreads_over_cases_and_levels() -> None:
    case_id = np.repeat([5, 7, 9], 8)  # three cases of eight slices
    rows = spread_rows(case_id, 6)
    assert len(set(rows.tolist())) == 6
    assert np.bincount(case_id[rows])[[5, 7, 9]].tolist() == [2, 2, 2]
    assert (rows % 8).tolist() == [2, 6] * 3  # levels at the quarter and three-quarter points
    stride_trap = spread_rows(case_id, 3)  # a fixed stride of 8 would pick one level in every case
    assert np.bincount(case_id[stride_trap])[[5, 7, 9]].tolist() == [1, 1, 1]
    assert spread_rows(case_id, 100).tolist() == list(range(24))
    uneven = spread_rows(np.array([1] * 2 + [2] * 10), 8)  # the small case is full, the rest go to the big one
    assert np.bincount(np.array([1] * 2 + [2] * 10)[uneven]).tolist() == [0, 2, 6]


def test_report_scores_correct_pairs_high_and_broken_pairs_low() -> None:
    train, test, synth = pairs(48, seed=0), pairs(16, seed=1), pairs(16, seed=2)
    good = segmentation_report(train, test, synth, settings=FAST, progress=False)
    keys = {"seg_dice_real", "seg_dice_real_full", "seg_dice_synthetic", "seg_dice_mixed", "seg_dice_per_class",
            "tstr_ratio", "mask_agreement", "mask_agreement_real", "n_train_real", "n_real_subset", "n_synthetic",
            "n_test", "image_size", "seed", "device", "training", "seconds_per_segmenter"}  # fmt: skip
    assert keys <= good.keys()
    assert set(good["seg_dice_per_class"]) == {"real", "real_full", "synthetic", "mixed"}
    assert all(set(d) == set(FOREGROUND) for d in good["seg_dice_per_class"].values())
    assert (good["n_real_subset"], good["n_synthetic"], good["n_test"], good["image_size"]) == (16, 16, 16, SIZE)
    assert good["training"]["steps"] == FAST.steps
    # Measured: Dice 0.85 (real_full) and 0.83 (synthetic), agreement 0.82, ratio 0.95; broken pairs
    # 0.28 / 0.04 (synthetic), 0.22 / 0.02 (agreement), 0.32 / 0.05 (ratio).
    assert good["seg_dice_real_full"] > 0.75 and good["seg_dice_synthetic"] > 0.75
    assert good["mask_agreement"] > 0.75 and good["tstr_ratio"] > 0.85

    shuffled = synth[0], synth[1][torch.roll(torch.arange(16), 1)]  # every slice with another slice's mask
    inverted = synth[0], 255 - synth[1]  # the bands reversed: background where the blob is brightest
    for broken in (shuffled, inverted):
        bad = segmentation_report(train, test, broken, settings=FAST, progress=False)
        assert bad["seg_dice_real_full"] == pytest.approx(good["seg_dice_real_full"])  # same judge
        assert bad["seg_dice_synthetic"] < good["seg_dice_synthetic"] - 0.3
        assert bad["tstr_ratio"] < good["tstr_ratio"] - 0.3
        assert bad["mask_agreement"] < good["mask_agreement"] - 0.3


def test_report_refuses_mismatched_inputs() -> None:
    train, test = pairs(8, seed=0), pairs(4, seed=1)
    small = tuple(x[..., :8, :8] for x in pairs(4, seed=2))
    with pytest.raises(ValueError, match="differ in size"):
        segmentation_report(train, test, small, settings=FAST, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        segmentation_report(train, test, (train[0].float(), train[1]), settings=FAST, progress=False)
    with pytest.raises(ValueError, match="mask values"):
        segmentation_report(train, test, (train[0], train[1] + 1), settings=FAST, progress=False)


def test_evaluate_segmentation_reads_a_packed_file(tiny_paired_h5) -> None:
    """The validate split's real pairs stand in for generated ones; the real subset spreads over cases."""
    from oasis_ldm.segmentation import evaluate_segmentation, real_pairs

    images, masks, _ = real_pairs(tiny_paired_h5, "validate", 16)  # resized to the "samples'" size
    report = evaluate_segmentation(tiny_paired_h5, (images, masks), settings=FAST, progress=False)
    assert (report["split"], report["test_split"], report["image_size"]) == ("train", "test", 16)
    assert (report["n_train_real"], report["n_real_subset"], report["n_synthetic"], report["n_test"]) == (16, 8, 8, 4)
    assert 0 <= report["mask_agreement"] <= 1 and report["tstr_ratio"] > 0
