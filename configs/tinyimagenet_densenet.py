"""DenseNet-BC-100 (k=12) on Tiny ImageNet (64x64, 200 classes).

    python scripts/train.py --config=configs/tinyimagenet_densenet.py
    python scripts/train.py --config=configs/tinyimagenet_densenet.py:vanilla

The argument is a Table-1 method row.  Tiny ImageNet is a manual download:
unzip ``tiny-imagenet-200.zip`` into the data directory (the validation set,
which has labels, is the test split).  Huang et al.'s recipe (SGD + Nesterov,
batch 64, weight decay 1e-4) with cosine annealing, warm-up and the paper's
augmentation.
"""

from dualflow.train.config import apply_method_row, image_recipe


def get_config(row: str = "bp_nf_ng"):
    c = image_recipe(
        "tiny_imagenet",
        "densenet_bc100",
        batch_size=64,
        num_epochs=100,
        weight_decay=1e-4,
        warmup_steps=5 * 1562,  # five epochs
        kl_anneal_steps=5 * 1562,
        crop_pad=8,
    )
    c.train.checkpoint_every = 5000
    return apply_method_row(c, row, ng_lr=2000.0)
