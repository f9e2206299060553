"""WRN-28-10 on CIFAR-100, BP/NF + natural gradient (the paper's Table 1).

    python scripts/train.py --config=configs/cifar100_wrn.py
    python scripts/train.py --config=configs/cifar100_wrn.py:vanilla     # other rows

The argument is a Table-1 method row (``vanilla``, ``reparam``,
``reparam_nf_ng_ensemble``, ``bp_nf``, ``bp_nf_ng``).  Training follows the
paper's recipe: cosine annealing with warm-up and its augmentation (4-pixel
crop + flip, RandAugment N=2 M=9, mixup / CutMix); SGD + Nesterov, batch 128,
weight decay 5e-4 for the deterministic network (Zagoruyko & Komodakis).
CIFAR-100 must be in the data directory (tfds-prepared or the
``cifar-100-python`` download).  ~11 s per bp step at batch 8 on a 2-core CPU:
this config is for a GPU/TPU.
"""

from dualflow.train.config import apply_method_row, image_recipe


def get_config(row: str = "bp_nf_ng"):
    c = image_recipe(
        "cifar100",
        "wrn28_10",
        batch_size=128,
        num_epochs=200,
        weight_decay=5e-4,
        warmup_steps=5 * 390,  # five epochs
        kl_anneal_steps=5 * 390,
    )
    c.train.checkpoint_every = 2000
    return apply_method_row(c, row, ng_lr=2000.0)
