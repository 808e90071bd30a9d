"""Datasets, shard samplers and loaders, including a real 2-worker horovodrun job."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from hvd_easgd.train.data import (
    DATASET_NAMES, EvalShardSampler, ShardSampler, build_datasets, eval_loader, train_loader,
)
from tests.hvdrun import run_workers


def _index_dataset(n):
    return TensorDataset(torch.zeros(n, 1), torch.arange(n))


# ------------------------------------------------------------------------------------ digits

def test_digits_is_real_bundled_data_with_a_fixed_split():
    a = build_datasets("digits")
    b = build_datasets("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)  # 1797 images, 80/20
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    x, y = a.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(int(y), int)
    xs = a.train.tensors[0]
    assert xs.min() >= 0 and xs.max() <= 1 and xs.max() > 0.9
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])  # seeded: same split every time
    assert torch.equal(a.train.tensors[1], b.train.tensors[1])
    # Stratified: every class in the test set.
    assert set(a.test.tensors[1].tolist()) == set(range(10))
    with pytest.raises(ValueError, match="8x8"):
        build_datasets("digits", image_size=16)


# -------------------------------------------------------------------------------------- fake

def test_fake_data_shapes_and_distinct_splits():
    f = build_datasets("fake", fake_train_size=10, fake_test_size=4, fake_image_shape=(1, 5, 7),
                       fake_num_classes=3)
    assert (len(f.train), len(f.test), f.num_classes, f.input_shape) == (10, 4, 3, (1, 5, 7))
    x, y = f.train[0]
    assert x.shape == (1, 5, 7) and 0 <= y < 3
    assert not torch.equal(f.train[0][0], f.test[0][0])
    assert torch.equal(f.train[3][0], f.train[3][0])  # deterministic per index
    g = build_datasets("fake", image_size=12)
    assert g.input_shape == (3, 12, 12) and g.train[0][0].shape == (3, 12, 12)
    assert len(g.train) == 1024 and len(g.test) == 256


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError) as err:
        build_datasets("mnist")
    for name in DATASET_NAMES:
        assert name in str(err.value)


# ------------------------------------------------------------------------------------ cifar10

def _write_fake_cifar(root, per_batch=4):
    """A tiny cifar-10-batches-py in torchvision's pickle format (uint8 rows of 3x32x32)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.randint(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "labels": rng.randint(0, 10, size=per_batch).tolist(),
                 "batch_label": name}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_datasets("cifar10", root=tmp_path / "nothing")
    msg = str(err.value)
    assert str(tmp_path / "nothing" / "cifar-10-batches-py") in msg
    assert "--set data.download=true" in msg and "cifar-10-python.tar.gz" in msg
    # A folder with some files missing names them.
    folder = _write_fake_cifar(tmp_path / "partial")
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="lacks test_batch"):
        build_datasets("cifar10", root=tmp_path / "partial")


def test_cifar10_loads_torchvision_format_with_the_papers_preprocessing(tmp_path):
    _write_fake_cifar(tmp_path)
    b = build_datasets("cifar10", root=str(tmp_path))
    assert (len(b.train), len(b.test), b.num_classes, b.input_shape) == (20, 4, 10, (3, 28, 28))
    assert b.train.classes[0] == "class0"
    x, y = b.train[0]
    assert x.shape == (3, 28, 28) and 0 <= y < 10
    assert x.min() < 0  # normalised per channel, not in [0, 1]
    # Test: a deterministic center crop; training: random crops and flips.
    assert torch.equal(b.test[1][0], b.test[1][0])
    assert any(not torch.equal(b.train[0][0], b.train[0][0]) for _ in range(10))
    names = [type(t).__name__ for t in b.train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in b.test.transform.transforms][0] == "CenterCrop"
    assert build_datasets("cifar10", root=tmp_path, image_size=24).train[0][0].shape == (3, 24, 24)


# ----------------------------------------------------------------------------------- imagenet

def _write_image_folder(root, classes, per_class=2, size=(40, 30)):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{c}_{i}.JPEG", format="JPEG")


def test_imagenet_missing_root_describes_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_datasets("imagenet", root=tmp_path)
    msg = str(err.value)
    assert f"{tmp_path}/train/<class>/" in msg and f"{tmp_path}/val/<class>/" in msg
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        build_datasets("imagenet", root=tmp_path)


def test_imagenet_image_folder(tmp_path):
    _write_image_folder(tmp_path, ["n01", "n02", "n03"])
    b = build_datasets("imagenet", root=tmp_path, image_size=32)
    assert (len(b.train), len(b.test), b.num_classes, b.input_shape) == (6, 6, 3, (3, 32, 32))
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and y == 0
    names = [type(t).__name__ for t in b.train.transform.transforms]
    assert names == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    # The paper's default: OverFeat's random 221 crops of images resized to 256; eval resizes
    # to 256 first, then takes the center crop.
    b = build_datasets("imagenet", root=tmp_path)
    assert b.input_shape == (3, 221, 221) and b.test[5][0].shape == (3, 221, 221)
    assert b.train[0][0].shape == (3, 221, 221)
    train_tf = b.train.transform.transforms
    assert (train_tf[0].size, train_tf[1].size) == (256, (221, 221))
    resize = b.test.transform.transforms[0]
    assert type(resize).__name__ == "Resize" and resize.size == 256
    b = build_datasets("imagenet", root=tmp_path, augment="resized_crop")
    names = [type(t).__name__ for t in b.train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    with pytest.raises(ValueError, match="overfeat"):
        build_datasets("imagenet", root=tmp_path, augment="autoaugment")
    with pytest.raises(ValueError, match="only the imagenet"):
        build_datasets("digits", augment="overfeat")


def test_imagenet_train_and_val_classes_must_match(tmp_path):
    _write_image_folder(tmp_path, ["n01", "n02"])
    (tmp_path / "val" / "n02").rename(tmp_path / "val" / "n09")
    with pytest.raises(ValueError, match="same class folders"):
        build_datasets("imagenet", root=tmp_path)


# ------------------------------------------------------------------------------------ samplers

@pytest.mark.parametrize("n, p", [(100, 3), (64, 4), (7, 2)])
def test_train_shards_are_disjoint_equal_and_cover_all_but_the_remainder(n, p):
    ds = _index_dataset(n)
    shards = []
    for r in range(p):
        s = ShardSampler(ds, rank=r, world_size=p, seed=5)
        s.set_epoch(0)
        shards.append(list(s))
    assert all(len(sh) == n // p for sh in shards)
    flat = [i for sh in shards for i in sh]
    assert len(set(flat)) == len(flat) == (n // p) * p  # disjoint; drops only n % p samples
    assert set(flat) <= set(range(n))


def test_train_shards_are_epoch_seeded_and_resume_mid_epoch():
    ds = _index_dataset(50)
    s = ShardSampler(ds, rank=1, world_size=2, seed=5)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(e0) != list(range(1, 50, 2))  # shuffled, new order each epoch
    again = ShardSampler(ds, rank=1, world_size=2, seed=5)
    again.set_epoch(1)
    assert list(again) == e1  # same seed and epoch -> same order (on every worker and restart)
    other = ShardSampler(ds, rank=1, world_size=2, seed=6)
    other.set_epoch(1)
    assert list(other) != e1
    # Resume: skip what this worker already did in epoch 1.
    s.set_epoch(1, start_index=10)
    assert list(s) == e1[10:] and len(s) == 15
    s.set_epoch(2)  # the skip applies to one epoch only
    assert len(s) == 25
    with pytest.raises(ValueError, match="start_index"):
        s.set_epoch(2, start_index=26)


def test_train_loader_gives_every_worker_the_same_number_of_batches():
    ds = _index_dataset(103)
    loaders = [train_loader(ds, 8, rank=r, world_size=3, seed=0) for r in range(3)]
    assert {len(dl) for dl in loaders} == {34 // 8}
    for dl in loaders:
        dl.sampler.set_epoch(0)
        batches = [y for _, y in dl]
        assert len(batches) == 4 and all(len(y) == 8 for y in batches)
    dl = loaders[0]
    dl.sampler.set_epoch(0, start_index=16)
    assert len(dl) == 2 and len(list(dl)) == 2
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_loader(ds, 64, rank=0, world_size=2, seed=0)


@pytest.mark.parametrize("n, p", [(10, 3), (9, 3), (2, 4), (360, 2)])
def test_eval_shards_cover_the_test_set_exactly_once(n, p):
    ds = _index_dataset(n)
    seen = []
    sizes = []
    for r in range(p):
        dl = eval_loader(ds, 4, rank=r, world_size=p)
        got = [int(i) for _, y in dl for i in y]
        assert len(got) == len(dl.sampler)
        sizes.append(len(got))
        seen += got
    assert sorted(seen) == list(range(n))
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        EvalShardSampler(ds, rank=p, world_size=p)


def test_sharding_under_horovodrun(tmp_path):
    """Two real Gloo workers shard digits by hvd.rank()/hvd.size()."""
    res = run_workers("data_shard.py", tmp_path, np=2, args=["--batch-size", "32"])
    n_train, n_test = res[0]["n_train"], res[0]["n_test"]
    assert [r["rank"] for r in res] == [0, 1] and all(r["size"] == 2 for r in res)
    per_worker = (n_train // 2) // 32 * 32
    for epoch in ("epoch0", "epoch1"):
        a, b = res[0][epoch], res[1][epoch]
        assert len(a) == len(b) == per_worker
        assert not set(a) & set(b)
    assert res[0]["epoch0"] != res[0]["epoch1"]
    assert res[0]["all_batches"] == res[1]["all_batches"] == [per_worker // 32] * 2
    for r in res:
        assert r["resumed"] == r["epoch1"][64:]
    assert sorted(res[0]["eval"] + res[1]["eval"]) == list(range(n_test))
    assert res[0]["eval_total"] == res[1]["eval_total"] == n_test
