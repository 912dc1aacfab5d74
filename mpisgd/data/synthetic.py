"""Generated classification datasets, and the default dataset that ships with mpisgd.

Why generated: mpisgd must train out of the box on machines with no network (cluster compute nodes, CI),
and no real classification set is available offline from its dependencies (torch, numpy, h5py, scipy and
matplotlib bundle none; scikit-learn is not a dependency). A generated set is also exactly reproducible,
has a known difficulty, and costs nothing to ship: it is written on first use, deterministically.

The default dataset, "mpisgd-shapes" (version 1), imitates the classic 8x8 digits set: 10 classes of
1x8x8 images. Each class has two templates (smooth random blobs), every sample is one of its class's
templates, randomly translated by up to one pixel, scaled by 0.7..1.3 and covered by Gaussian pixel noise.
Translation makes it a task where a convnet beats an MLP which beats softmax regression, so the three
built-in models are distinguishable; 8192 training and 2048 validation samples (a power of two divides
evenly over 1, 2, 4 or 8 ranks) keep an epoch well under a second on one core.

Train and validation files share the templates (the task seed) and differ in the sample seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import h5py
import numpy as np

from mpisgd import environment
from mpisgd.checkpoint import atomic_h5_file
from mpisgd.data.hdf5 import read_arrays
from mpisgd.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]

GENERATOR_VERSION = 1


def _smooth_templates(rng: np.random.Generator, count: int, shape: tuple[int, int, int]) -> np.ndarray:
    """`count` images of `shape` (C, H, W), each a sum of three Gaussian blobs of random sign per
    channel, scaled to unit root-mean-square."""
    channels, height, width = shape
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    templates = np.zeros((count, channels, height, width))
    for index in range(count):
        for channel in range(channels):
            for _ in range(3):
                cy, cx = rng.uniform(0, height), rng.uniform(0, width)
                sigma = rng.uniform(0.12, 0.3) * min(height, width)
                amplitude = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5)
                templates[index, channel] += amplitude * np.exp(
                    -((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2)
                )
        templates[index] /= np.sqrt(np.mean(templates[index] ** 2)) + 1e-12
    return templates


def make_classification_arrays(
    n_samples: int,
    n_features: int,
    n_classes: int,
    seed: int,
    image_shape: Sequence[int] | None = None,
    *,
    sample_seed: int | None = None,
    clusters_per_class: int = 2,
    class_sep: float = 4.0,
    noise: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate a learnable classification set in memory; see `make_classification_h5`.

    Returns:
        (x float32 of shape (n_samples, n_features) or ``(n_samples, *image_shape)``, y int64).
    """
    if not (isinstance(n_samples, int) and n_samples > 0):
        raise ConfigError(f"n_samples must be a positive int, got {n_samples!r}")
    if not (isinstance(n_features, int) and n_features > 0):
        raise ConfigError(f"n_features must be a positive int, got {n_features!r}")
    if not (isinstance(n_classes, int) and n_classes >= 2):
        raise ConfigError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if not (isinstance(clusters_per_class, int) and clusters_per_class >= 1):
        raise ConfigError(f"clusters_per_class must be a positive int, got {clusters_per_class!r}")
    if image_shape is not None:
        image_shape = tuple(int(d) for d in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ConfigError(f"image_shape must be (channels, height, width), got {image_shape!r}")
        if int(np.prod(image_shape)) != n_features:
            raise ConfigError(
                f"image_shape {image_shape} holds {int(np.prod(image_shape))} values, "
                f"but n_features = {n_features}"
            )
    rng_task = np.random.default_rng([seed, 0])
    rng = np.random.default_rng([seed if sample_seed is None else sample_seed, 1])
    templates_count = n_classes * clusters_per_class
    labels = rng.integers(n_classes, size=n_samples)
    template_of_sample = labels * clusters_per_class + rng.integers(clusters_per_class, size=n_samples)
    if image_shape is None:
        # Per-dimension std class_sep/sqrt(d) puts centers about class_sep*sqrt(2) apart whatever d is.
        centers = rng_task.normal(scale=class_sep / np.sqrt(n_features), size=(templates_count, n_features))
        x = centers[template_of_sample] + noise * rng.normal(size=(n_samples, n_features))
    else:
        templates = _smooth_templates(rng_task, templates_count, image_shape)
        x = templates[template_of_sample] * rng.uniform(0.7, 1.3, size=(n_samples, 1, 1, 1))
        max_shift = max(1, min(image_shape[1:]) // 8)
        shifts = rng.integers(-max_shift, max_shift + 1, size=(n_samples, 2))
        for dy, dx in np.unique(shifts, axis=0):
            moved = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            x[moved] = np.roll(x[moved], (int(dy), int(dx)), axis=(2, 3))
        x += noise * rng.normal(size=x.shape)
    return x.astype(np.float32), labels.astype(np.int64)


def make_classification_h5(
    path: PathLike,
    n_samples: int,
    n_features: int,
    n_classes: int,
    seed: int,
    image_shape: Sequence[int] | None = None,
    *,
    sample_seed: int | None = None,
    clusters_per_class: int = 2,
    class_sep: float = 4.0,
    noise: float = 1.0,
) -> Path:
    """Write a generated, learnable classification set to an HDF5 file in mpisgd's format.

    Without `image_shape`: Gaussian clusters, `clusters_per_class` per class, centers about
    `class_sep * sqrt(2)` apart (in units of the noise std) whatever `n_features` is. With `image_shape`
    (C, H, W): smooth random templates, randomly translated and scaled, plus pixel noise (see the module
    docstring). The file is written atomically (temp file + rename), so ranks that generate the same file
    at once do not corrupt each other.

    Args:
        path: the file to write (replaced if it exists).
        n_samples: number of samples.
        n_features: features per sample; must equal prod(image_shape) when that is given.
        n_classes: number of classes, >= 2.
        seed: the task (cluster centers / templates); datasets with the same seed share the task.
        image_shape: (C, H, W) to store x as images, for the cnn model.
        sample_seed: seed of the samples (default: `seed`); use different ones for train and validation.
        clusters_per_class: clusters (templates) per class; > 1 makes the classes non-convex.
        class_sep: cluster separation, flat mode only.
        noise: std of the Gaussian noise added to every value.

    Returns:
        The path written.
    """
    x, y = make_classification_arrays(
        n_samples,
        n_features,
        n_classes,
        seed,
        image_shape,
        sample_seed=sample_seed,
        clusters_per_class=clusters_per_class,
        class_sep=class_sep,
        noise=noise,
    )
    path = Path(path)
    with atomic_h5_file(path) as file:
        file.create_dataset("x", data=x)
        file.create_dataset("y", data=y)
        file.attrs["num_classes"] = n_classes
        file.attrs["generator"] = "mpisgd.data.make_classification_h5"
        file.attrs["generator_version"] = GENERATOR_VERSION
        file.attrs["seed"] = seed
        file.attrs["sample_seed"] = seed if sample_seed is None else sample_seed
    return path


@dataclass(frozen=True)
class DatasetFiles:
    """A train/validation pair of HDF5 files and what a model needs to know about them."""

    train_path: Path
    val_path: Path
    input_shape: tuple[int, ...]
    num_classes: int

    def arrays(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((x_train, y_train), (x_val, y_val)) read whole into memory (the default set is small)."""
        return read_arrays(self.train_path), read_arrays(self.val_path)


DEFAULT_DATASET_NAME = "mpisgd-shapes"
DEFAULT_IMAGE_SHAPE = (1, 8, 8)
DEFAULT_NUM_CLASSES = 10
DEFAULT_SEED = 2017
DEFAULT_TRAIN_SAMPLES = 8192
DEFAULT_VAL_SAMPLES = 2048


def default_data_dir() -> Path:
    """Where `default_dataset` writes: $MPISGD_DATA_DIR, else $XDG_CACHE_HOME/mpisgd, else
    ~/.cache/mpisgd."""
    configured = environment.read("MPISGD_DATA_DIR")
    if configured:
        return Path(str(configured))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mpisgd"


def _is_current(path: Path, n_samples: int, sample_seed: int) -> bool:
    try:
        with h5py.File(path, "r") as file:
            return (
                int(file.attrs.get("generator_version", -1)) == GENERATOR_VERSION
                and int(file.attrs.get("seed", -1)) == DEFAULT_SEED
                and int(file.attrs.get("sample_seed", -1)) == sample_seed
                and file["x"].shape == (n_samples, *DEFAULT_IMAGE_SHAPE)
            )
    except (OSError, KeyError):
        return False


def default_dataset(
    directory: PathLike | None = None,
    *,
    train_samples: int = DEFAULT_TRAIN_SAMPLES,
    val_samples: int = DEFAULT_VAL_SAMPLES,
) -> DatasetFiles:
    """The built-in "mpisgd-shapes" dataset (see the module docstring), generated on first use.

    Every rank may call this at once: each writes the same bytes atomically, and an existing current
    file is reused.

    Args:
        directory: where the files live; default `default_data_dir()`.
        train_samples, val_samples: sizes of the two files.

    Returns:
        The file paths, input shape (1, 8, 8) and number of classes (10).
    """
    directory = Path(directory) if directory is not None else default_data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n_samples, sample_seed in (
        ("train", train_samples, DEFAULT_SEED),
        ("val", val_samples, DEFAULT_SEED + 1),
    ):
        path = directory / f"{DEFAULT_DATASET_NAME}-v{GENERATOR_VERSION}-{split}-{n_samples}.h5"
        if not _is_current(path, n_samples, sample_seed):
            make_classification_h5(
                path,
                n_samples,
                int(np.prod(DEFAULT_IMAGE_SHAPE)),
                DEFAULT_NUM_CLASSES,
                DEFAULT_SEED,
                DEFAULT_IMAGE_SHAPE,
                sample_seed=sample_seed,
            )
        paths.append(path)
    return DatasetFiles(paths[0], paths[1], DEFAULT_IMAGE_SHAPE, DEFAULT_NUM_CLASSES)
