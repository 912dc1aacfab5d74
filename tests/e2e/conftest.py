"""Fixtures shared by the end-to-end tests of the parameter-server strategies."""

import pytest

from mpisgd.data import make_classification_h5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """512 training and 512 validation samples of an easy 3-class problem (what `mpisgd make-data` writes);
    a module that needs other data defines its own ``data``."""
    folder = tmp_path_factory.mktemp("data")
    for name, sample_seed in (("train", 1), ("val", 2)):
        make_classification_h5(folder / f"{name}.h5", n_samples=512, n_features=6, n_classes=3, seed=5,
                               sample_seed=sample_seed)
    return folder / "train.h5", folder / "val.h5"
