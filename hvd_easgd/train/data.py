"""Datasets (digits, CIFAR-10, ImageNet, fake) and the per-worker samplers and loaders.

``build_datasets(name, ...)`` returns a ``DataBundle`` of train and test datasets that yield
``(image_tensor, int_label)``. ``train_loader`` gives each worker its own shuffled, epoch-seeded
shard (same number of batches on every worker; mid-epoch resume via ``set_epoch(epoch,
start_index)``); ``eval_loader`` gives every test sample to exactly one worker exactly once.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

__all__ = [
    "DATASET_NAMES", "DEFAULT_ROOTS", "DataBundle", "build_datasets", "ShardSampler",
    "EvalShardSampler", "train_loader", "eval_loader",
]

DATASET_NAMES = ("digits", "cifar10", "imagenet", "fake")

#: Where ``root=None`` looks (relative to the working directory).
DEFAULT_ROOTS = {"cifar10": "data/cifar10", "imagenet": "data/imagenet"}

# Per-channel statistics of the training sets (ImageNet: the usual torchvision values).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_CROP = 28      # the paper trains on 28x28 crops of the 32x32 images
IMAGENET_CROP = 221  # the paper's ImageNet input
#: ImageNet training augmentations (``data.augment``). ``overfeat``: the network the paper
#: follows (OverFeat, Sermanet et al. 2013) trained on random 221x221 crops, and their flips, of
#: images resized to 256 on the shorter side. ``resized_crop``: torchvision's RandomResizedCrop
#: (scale and aspect jitter, as in most ResNet recipes) + flips.
IMAGENET_AUGMENTS = ("overfeat", "resized_crop")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: Tuple[int, int, int]  # (channels, height, width) of one transformed sample


# ---------------------------------------------------------------------------------- datasets

def build_datasets(
    name: str,
    *,
    root: Optional[Union[str, os.PathLike]] = None,
    download: bool = False,
    image_size: Optional[int] = None,
    augment: Optional[str] = None,
    fake_train_size: int = 1024,
    fake_test_size: int = 256,
    fake_image_shape: Tuple[int, int, int] = (3, 32, 32),
    fake_num_classes: int = 10,
) -> DataBundle:
    """Build the train and test datasets called ``name`` (one of ``DATASET_NAMES``).

    digits    scikit-learn's bundled 8x8 digits (1797 images, no download), a fixed seeded
              stratified 80/20 split, pixels scaled to [0, 1], shape (1, 8, 8).
    cifar10   torchvision CIFAR10 under ``root`` (``root/cifar-10-batches-py``); training:
              random ``image_size`` (default 28) crops + horizontal flips; test: center crop;
              per-channel normalisation. ``download=True`` fetches it into ``root``.
    imagenet  ImageFolder layout ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``;
              training (``augment``): ``overfeat`` (default; resize the shorter side to
              256/221 of the crop, random ``image_size`` (default 221) crops + flips) or
              ``resized_crop`` (RandomResizedCrop + flips); eval: resize to 256/221 of the
              crop, then center crop; normalisation.
    fake      torchvision FakeData of ``fake_image_shape`` (``image_size`` overrides H and W),
              train and test drawn with different seeds; labels are random.
    """
    key = str(name).strip().lower()
    if augment is not None and key != "imagenet":
        raise ValueError(f"augment={augment!r}: only the imagenet dataset has a choice of "
                         f"augmentation; leave it unset (null) for {key}")
    if key == "digits":
        return _digits(image_size)
    if key == "cifar10":
        return _cifar10(root, download, image_size)
    if key == "imagenet":
        return _imagenet(root, image_size, augment)
    if key == "fake":
        return _fake(fake_train_size, fake_test_size, fake_image_shape, fake_num_classes,
                     image_size)
    raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASET_NAMES)}")


def _digits(image_size: Optional[int]) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size not in (None, 8):
        raise ValueError(f"the digits dataset is 8x8; image_size={image_size} is not supported")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(
        idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target)
    train_idx = torch.as_tensor(sorted(train_idx))
    test_idx = torch.as_tensor(sorted(test_idx))
    return DataBundle(
        train=TensorDataset(x[train_idx], y[train_idx]),
        test=TensorDataset(x[test_idx], y[test_idx]),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _resolve_root(name: str, root) -> Path:
    return Path(root if root is not None else DEFAULT_ROOTS[name]).expanduser()


_CIFAR10_CLASS = None


def _cifar10_class():
    """torchvision's CIFAR10, except that the md5 of each batch file is not recomputed at every
    start of every worker (torchvision still checks the archive's md5 when it downloads; a
    truncated file still fails when it is unpickled). Built lazily so that importing this module
    does not import torchvision; reachable as ``hvd_easgd.train.data._CIFAR10`` for pickling."""
    global _CIFAR10_CLASS
    if _CIFAR10_CLASS is None:
        from torchvision.datasets import CIFAR10

        class _CIFAR10(CIFAR10):
            train_list = [[f, None] for f, _ in CIFAR10.train_list]
            test_list = [[f, None] for f, _ in CIFAR10.test_list]
            meta = dict(CIFAR10.meta, md5=None)

        _CIFAR10.__module__ = __name__
        _CIFAR10.__qualname__ = "_CIFAR10"
        _CIFAR10_CLASS = _CIFAR10
    return _CIFAR10_CLASS


def __getattr__(name):
    if name == "_CIFAR10":
        return _cifar10_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cifar10(root, download: bool, image_size: Optional[int]) -> DataBundle:
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR10

    path = _resolve_root("cifar10", root)
    folder = path / CIFAR10.base_folder
    if not download:
        needed = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list]
        needed.append(CIFAR10.meta["filename"])
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            where = (f"{folder} does not exist" if not folder.is_dir()
                     else f"{folder} lacks {', '.join(missing)}")
            raise FileNotFoundError(
                f"CIFAR-10 not found: {where}. torchvision expects the python version of "
                f"CIFAR-10 extracted at <data.root>/{CIFAR10.base_folder}/ (data_batch_1..5, "
                f"test_batch, batches.meta), here data.root = {path}. Either download it once "
                f"by adding `--set data.download=true` (about 170 MB), or fetch {CIFAR10.url} yourself and extract it into "
                f"{path} (`tar -xzf {CIFAR10.filename} -C {path}`).")
    crop = CIFAR_CROP if image_size is None else int(image_size)
    if crop < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    resize = [T.Resize(crop)] if crop > 32 else []
    norm = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    train_tf = T.Compose(resize + [T.RandomCrop(crop), T.RandomHorizontalFlip()] + norm)
    test_tf = T.Compose(resize + [T.CenterCrop(crop)] + norm)
    cifar_cls = _cifar10_class()
    if download:
        # Workers that share the folder take turns: the first downloads and extracts, the
        # others then find the files and skip the download.
        path.mkdir(parents=True, exist_ok=True)
        with _file_lock(path / ".cifar10-download.lock"):
            cifar_cls(str(path), train=True, download=True)
    train = cifar_cls(str(path), train=True, transform=train_tf)
    test = cifar_cls(str(path), train=False, transform=test_tf, download=False)
    return DataBundle(train=train, test=test, num_classes=10, input_shape=(3, crop, crop))


_IMAGENET_LAYOUT = (
    "expected the ImageFolder layout:\n"
    "  {root}/train/<class>/<image>.JPEG   (one folder per class, e.g. n01440764/)\n"
    "  {root}/val/<class>/<image>.JPEG     (the SAME class folders)\n"
    "ILSVRC's validation images come in one flat folder: sort them into class folders first "
    "(e.g. with the widely used valprep.sh script). Set the location with "
    "`--set data.root=/path/to/imagenet`.")


def _imagenet(root, image_size: Optional[int], augment: Optional[str] = None) -> DataBundle:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    path = _resolve_root("imagenet", root)
    layout = _IMAGENET_LAYOUT.format(root=path)
    for split in ("train", "val"):
        d = path / split
        if not d.is_dir():
            raise FileNotFoundError(f"ImageNet not found: {d} does not exist; {layout}")
        if not any(p.is_dir() for p in d.iterdir()):
            raise FileNotFoundError(f"ImageNet: {d} has no class folders; {layout}")
    crop = IMAGENET_CROP if image_size is None else int(image_size)
    if crop < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    augment = augment or IMAGENET_AUGMENTS[0]
    if augment not in IMAGENET_AUGMENTS:
        raise ValueError(f"augment must be one of {IMAGENET_AUGMENTS}, got {augment!r}")
    resize = int(round(crop * 256 / IMAGENET_CROP))
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    jitter = ([T.Resize(resize), T.RandomCrop(crop)] if augment == "overfeat"
              else [T.RandomResizedCrop(crop)])
    train_tf = T.Compose(jitter + [T.RandomHorizontalFlip()] + norm)
    eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(crop)] + norm)
    try:
        train = ImageFolder(str(path / "train"), transform=train_tf)
        test = ImageFolder(str(path / "val"), transform=eval_tf)
    except FileNotFoundError as e:  # e.g. class folders without any image
        raise FileNotFoundError(f"ImageNet: {e}; {layout}") from e
    if test.class_to_idx != train.class_to_idx:
        only_train = sorted(set(train.classes) - set(test.classes))[:5]
        only_val = sorted(set(test.classes) - set(train.classes))[:5]
        raise ValueError(
            f"ImageNet: {path}/train and {path}/val must hold the same class folders "
            f"(only in train: {only_train}, only in val: {only_val}); {layout}")
    return DataBundle(train=train, test=test, num_classes=len(train.classes),
                      input_shape=(3, crop, crop))


def _fake(train_size: int, test_size: int, shape, num_classes: int,
          image_size: Optional[int]) -> DataBundle:
    from torchvision import transforms as T
    from torchvision.datasets import FakeData

    c, h, w = (int(v) for v in shape)
    if image_size is not None:
        h = w = int(image_size)
    if c not in (1, 2, 3, 4) or h < 1 or w < 1:
        raise ValueError(f"fake data: image shape must be (1-4 channels, H, W), got {(c, h, w)}")
    if train_size < 1 or test_size < 1 or num_classes < 1:
        raise ValueError("fake data: fake_train_size, fake_test_size and fake_num_classes must "
                         "be >= 1")
    tf = T.ToTensor()
    train = FakeData(size=train_size, image_size=(c, h, w), num_classes=num_classes,
                     transform=tf, random_offset=0)
    # A different offset gives test images other than the training ones.
    test = FakeData(size=test_size, image_size=(c, h, w), num_classes=num_classes,
                    transform=tf, random_offset=train_size + 1_000_003)
    return DataBundle(train=train, test=test, num_classes=num_classes, input_shape=(c, h, w))


# ---------------------------------------------------------------------------------- samplers

class ShardSampler(DistributedSampler):
    """This worker's shard of a training set: shuffled with ``seed + epoch``, ``drop_last=True``
    so that every worker gets the same ``len(dataset) // world_size`` samples.

    ``set_epoch(epoch, start_index)`` selects the epoch's permutation and skips the first
    ``start_index`` samples of this worker's shard (to resume mid-epoch); it applies to the
    current epoch only, the next ``set_epoch`` call sets it again (default 0).
    """

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int, seed: int = 0,
                 shuffle: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        if len(dataset) < world_size:
            raise ValueError(f"a dataset of {len(dataset)} samples cannot be split over "
                             f"{world_size} workers")
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index must be in [0, {self.num_samples}], got {start_index}")
        super().set_epoch(epoch)
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class EvalShardSampler(Sampler):
    """Every index of the dataset goes to exactly one worker, once: worker r gets r, r+p, ...
    No padding, so shards differ in size by at most one; sum the per-worker error counts and
    sample counts (allreduce) to get the exact test error."""

    def __init__(self, dataset: Dataset, *, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.n = len(dataset)
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n - self.rank) / self.world_size))


class TrainLoader(DataLoader):
    """A DataLoader over a :class:`ShardSampler` that is told where each epoch starts."""

    def start_epoch(self, epoch: int, start_index: int, seed: int) -> None:
        """Select ``epoch``'s permutation, skip the first ``start_index`` samples of the shard,
        and seed the loader's own generator with ``seed``: the DataLoader draws its base seed
        from that generator, not from the global RNG, so an iterator created mid-epoch (on
        resume) leaves the training RNG stream alone."""
        self.sampler.set_epoch(epoch, start_index=start_index)
        self.generator = torch.Generator().manual_seed(int(seed))


def _loader(dataset, batch_size, sampler, drop_last, num_workers, cls=DataLoader) -> DataLoader:
    # No persistent_workers: DataLoader processes start afresh each epoch and take their seeds
    # from the loader's generator then, so each epoch's augmentations follow (seed, epoch).
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return cls(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers, pin_memory=torch.cuda.is_available())


def train_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 num_workers: int = 0) -> TrainLoader:
    """Batches of this worker's training shard (``loader.sampler`` is a ``ShardSampler``: call
    ``loader.start_epoch(...)`` or ``loader.sampler.set_epoch(epoch[, start_index])`` before
    each epoch). Incomplete last batches are dropped, so every worker runs the same number of
    steps per epoch."""
    sampler = ShardSampler(dataset, rank=rank, world_size=world_size, seed=seed)
    if len(sampler) < batch_size:
        raise ValueError(
            f"each of the {world_size} workers gets {len(sampler)} training samples, fewer "
            f"than one batch of {batch_size}: lower the batch size or use more data")
    return _loader(dataset, batch_size, sampler, True, num_workers, TrainLoader)


def eval_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int,
                num_workers: int = 0) -> DataLoader:
    """Batches of this worker's share of the test set (``EvalShardSampler``; nothing dropped)."""
    sampler = EvalShardSampler(dataset, rank=rank, world_size=world_size)
    return _loader(dataset, batch_size, sampler, False, num_workers)
