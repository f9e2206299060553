"""Describe any registered architecture (no data needed).

    python scripts/train.py --config=configs/arch.py:wrn28_10 --describe
    python scripts/train.py --config=configs/arch.py:densenet_bc100,tiny_imagenet \
        --describe
    python scripts/train.py --config=configs/arch.py:resnet20 --describe \
        --config.model.norm=none        # the normalisation-free (NF) variant

The argument is ``<model>[,<dataset>]`` (dataset default: cifar10; it sets the
input shape and the number of classes).  The model runs with the published
normalisation unless ``model.norm`` says otherwise (``none``, ``batch``,
``layer``).  This config cannot train: image-model training configs are not
in place yet (build the models with ``dualflow.models.build_model`` and train
them with ``dualflow.train``).
"""

import ml_collections


def get_config(arg: str = "resnet20") -> ml_collections.ConfigDict:
    name, _, dataset = arg.partition(",")
    c = ml_collections.ConfigDict()
    c.dataset = dataset or "cifar10"
    c.model = ml_collections.ConfigDict()
    c.model.name = name
    c.model.norm = "published"  # or none / batch / layer
    c.model.kwargs = ml_collections.ConfigDict()  # family options, e.g. dropout
    c.describe_only = True
    return c
