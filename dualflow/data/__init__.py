"""Data loaders.  The data directory comes from the config field ``data_dir``,
then the ``DUALFLOW_DATA_DIR`` environment variable (see :func:`resolve_data_dir`)."""

from dualflow.data.augment import (
    AugmentConfig,
    augment_batch,
    cutmix,
    mix_batch,
    mixup,
    one_hot,
    rand_augment,
    random_crop,
    random_flip,
)
from dualflow.data.digits import load_sklearn_digits
from dualflow.data.fetch import default_cache_dir, fetch_uci
from dualflow.data.fingerprint import fingerprint
from dualflow.data.images import ImageDataset, load_image_dataset
from dualflow.data.info import IMAGE_DATASETS, ImageDatasetInfo, dataset_info
from dualflow.data.paths import DataNotFoundError, resolve_data_dir
from dualflow.data.uci import (
    UCI_DATASETS,
    UCIData,
    UCISplit,
    inner_split_indices,
    load_uci,
    uci_split,
)
from dualflow.errors import DataError

__all__ = [
    "AugmentConfig",
    "augment_batch",
    "cutmix",
    "mix_batch",
    "mixup",
    "one_hot",
    "rand_augment",
    "random_crop",
    "random_flip",
    "IMAGE_DATASETS",
    "ImageDataset",
    "ImageDatasetInfo",
    "dataset_info",
    "UCI_DATASETS",
    "DataError",
    "DataNotFoundError",
    "default_cache_dir",
    "fetch_uci",
    "fingerprint",
    "UCIData",
    "UCISplit",
    "inner_split_indices",
    "load_uci",
    "load_image_dataset",
    "load_sklearn_digits",
    "resolve_data_dir",
    "uci_split",
]
