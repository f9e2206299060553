"""Pre-activation ResNet-20 on CIFAR-10.

    python scripts/train.py --config=configs/cifar10_resnet.py            # BP/NF+NG
    python scripts/train.py --config=configs/cifar10_resnet.py:vanilla    # Table-1 row

The argument is a Table-1 method row (``vanilla``, ``reparam``,
``reparam_nf_ng_ensemble``, ``bp_nf``, ``bp_nf_ng``; see
``dualflow.train.config.METHOD_ROWS``).  He et al.'s recipe (SGD + Nesterov,
batch 128, weight decay 1e-4 for the deterministic network, 4-pixel crop +
flip) with cosine annealing instead of step decay.  CIFAR-10 must be in the
data directory (tfds-prepared or the ``cifar-10-batches-py`` download).
"""

from dualflow.train.config import apply_method_row, image_recipe


def get_config(row: str = "bp_nf_ng"):
    c = image_recipe(
        "cifar10",
        "resnet20",
        batch_size=128,
        num_epochs=160,
        weight_decay=1e-4,
        warmup_steps=390,  # one epoch
        kl_anneal_steps=2000,
        paper_augment=False,  # He et al.: crop + flip only
    )
    # natural-gradient rows: the mean step is v * grad with v ~ 1e-3 / fan_in,
    # so the rate is ~N times an SGD rate (see README, natural gradient)
    return apply_method_row(c, row, ng_lr=2000.0)
