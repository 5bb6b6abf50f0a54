"""OasisH5Dataset: items, batches, in-RAM mode, lazy handles under DataLoader workers, DDP split."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import OasisTree, write_tree
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.pack import PackOptions, pack

MASK_VALUES = {0, 85, 170, 255}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[str, OasisTree]:
    root = tmp_path_factory.mktemp("ds")
    tree = write_tree(root / "src", cases={"train": [1, 2, 3], "validate": [4], "test": [5]}, slices=5, size=32)
    shutil.rmtree(tree.mask_dir("test"))
    path = root / "o.h5"
    pack(tree.root, path, PackOptions(workers=0))
    return str(path), tree


def _expected(tree: OasisTree, split: str, masks: bool = False) -> torch.Tensor:
    table = tree.masks if masks else tree.images
    return torch.from_numpy(np.stack([table[(split, c, s)] for c, s in tree.rows(split)]))[:, None]


def test_items_are_scaled_images_in_row_order(packed):
    path, tree = packed
    ds = OasisH5Dataset(path, "train")
    expected = _expected(tree, "train")
    assert len(ds) == 15
    x = ds[7]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected[7].float() / 127.5 - 1)
    assert ds.case_id.tolist() == [c for c, _ in tree.rows("train")]
    assert ds.slice_idx.tolist() == [s for _, s in tree.rows("train")]
    assert ds.filenames()[0] == "case_001_slice_0.nii.png"


def test_raw_and_masks(packed):
    path, tree = packed
    ds = OasisH5Dataset(path, "validate", raw=True, with_mask=True)
    image, mask = ds[3]
    assert image.dtype == torch.uint8 and mask.dtype == torch.uint8
    assert torch.equal(image, _expected(tree, "validate")[3])
    assert torch.equal(mask, _expected(tree, "validate", masks=True)[3])
    assert torch.equal(ds.read_raw([4, 0]), _expected(tree, "validate")[[4, 0]])
    assert torch.equal(ds.read_raw(slice(1, 3), mask=True), _expected(tree, "validate", masks=True)[1:3])


def test_getitems_unsorted_and_repeated_indices(packed):
    path, tree = packed
    ds = OasisH5Dataset(path, "train", raw=True)
    order = [9, 2, 2, 14, 0, 3, 4, 5]
    batch = torch.stack(ds.__getitems__(order))
    assert torch.equal(batch, _expected(tree, "train")[order])


@pytest.mark.parametrize("image_size", [None, 16, 48])
def test_in_memory_equals_disk(packed, image_size):
    path, _ = packed
    disk = OasisH5Dataset(path, "train", raw=True, with_mask=True, image_size=image_size)
    ram = OasisH5Dataset(path, "train", raw=True, with_mask=True, image_size=image_size, in_memory=True)
    order = [3, 1, 14, 7]
    for a, b in zip(disk.__getitems__(order), ram.__getitems__(order), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for i in (0, 11):
        assert torch.equal(disk[i][0], ram[i][0]) and torch.equal(disk[i][1], ram[i][1])
    size = image_size or 32
    assert disk[0][0].shape == (1, size, size)
    assert set(torch.unique(ram.read_raw(range(15), mask=True)).tolist()) <= MASK_VALUES


def test_image_size_resizes_antialiased(packed):
    path, tree = packed
    x = OasisH5Dataset(path, "train", image_size=16)[0]
    assert x.shape == (1, 16, 16)
    # torch's antialiased bilinear is built to match PIL's BILINEAR resize (a triangle filter
    # widened by the scale); PIL rounds to uint8, hence the tolerance of one grey level
    src = Image.fromarray(tree.images[("train", 1, 0)])
    reference = torch.tensor(np.array(src.resize((16, 16), Image.BILINEAR)), dtype=torch.float32)
    assert torch.allclose((x[0] + 1) * 127.5, reference, atol=1.0)


def test_flip_moves_image_and_mask_together(packed):
    path, _ = packed
    plain = OasisH5Dataset(path, "train", with_mask=True)
    flipped = OasisH5Dataset(path, "train", with_mask=True, augment="flip")
    torch.manual_seed(0)
    batch = flipped.__getitems__(list(range(15)))
    n_flipped = 0
    for i, (image, mask) in enumerate(batch):
        ref_image, ref_mask = plain[i]
        if torch.equal(image, ref_image):
            assert torch.equal(mask, ref_mask)
        else:
            assert torch.equal(image, ref_image.flip(-1)) and torch.equal(mask, ref_mask.flip(-1))
            n_flipped += 1
    assert 0 < n_flipped < 15


@pytest.mark.parametrize("augment", ["flip", "seed"])
def test_augmented_items_stay_in_range(packed, augment):
    path, _ = packed
    ds = OasisH5Dataset(path, "train", with_mask=True, augment=augment, image_size=24)
    image, mask = ds[5]  # one item: a batch of one
    assert image.shape == (1, 24, 24) and mask.shape == (1, 24, 24)
    assert image.min() >= -1 and image.max() <= 1
    assert set(torch.unique(mask).tolist()) <= MASK_VALUES
    images, masks = zip(*ds.__getitems__([0, 1, 2]), strict=True)  # batched path
    assert torch.stack(images).abs().max() <= 1
    assert set(torch.unique(torch.stack(masks)).tolist()) <= MASK_VALUES


def test_lazy_handle_and_multi_worker_loader(packed):
    path, tree = packed
    ds = OasisH5Dataset(path, "train", raw=True)
    assert ds._file is None  # nothing open after __init__
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._file is None
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert ds._file is None  # the workers opened their own handles
    assert torch.equal(torch.cat(batches), _expected(tree, "train"))
    ds[0]  # the parent may read too; its handle never travels
    assert ds._file is not None
    assert pickle.loads(pickle.dumps(ds))._file is None
    ds.close()


def test_in_memory_under_workers(packed):
    path, tree = packed
    ds = OasisH5Dataset(path, "train", raw=True, in_memory=True)
    batches = list(DataLoader(ds, batch_size=5, num_workers=2))
    assert torch.equal(torch.cat(batches), _expected(tree, "train"))


def test_distributed_sampler_partitions_the_split(packed):
    path, tree = packed
    ds = OasisH5Dataset(path, "train", raw=True)
    expected = _expected(tree, "train")
    seen = []
    for rank in range(4):
        sampler = DistributedSampler(ds, num_replicas=4, rank=rank, shuffle=True, seed=1, drop_last=True)
        indices = list(sampler)
        batch = torch.cat(list(DataLoader(ds, batch_size=2, sampler=sampler)))
        assert torch.equal(batch, expected[indices])
        seen.append(set(indices))
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert sum(map(len, seen)) == 12  # 15 rows, 4 ranks, drop_last: 3 each


def test_clear_errors(packed, tmp_path):
    path, _ = packed
    with pytest.raises(FileNotFoundError, match=r"missing\.h5"):
        OasisH5Dataset(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match=r"o\.h5: no split 'bogus'"):
        OasisH5Dataset(path, "bogus")
    with pytest.raises(ValueError, match="has no masks"):
        OasisH5Dataset(path, "test", with_mask=True)
    with pytest.raises(ValueError, match="augment='blur'"):
        OasisH5Dataset(path, augment="blur")
    not_h5 = tmp_path / "x.h5"
    not_h5.write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"x\.h5"):
        OasisH5Dataset(not_h5)
