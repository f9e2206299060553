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

from dualflow.train.config import apply_method_row, base_config


def get_config(row: str = "bp_nf_ng"):
    c = base_config()
    c.dataset = "cifar100"
    c.model.name = "wrn28_10"
    c.model.kwargs.init_var = 1e-3
    c.model.kwargs.prior_var = 2.0
    c.loss.kl_weight = 1.0
    c.loss.kl_anneal_steps = 5 * 390
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.grad_clip = 5.0
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 5 * 390  # five epochs
    c.augment.crop_pad = 4
    c.augment.flip = True
    c.augment.randaugment_ops = 2
    c.augment.randaugment_magnitude = 9.0
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.train.batch_size = 128
    c.train.num_epochs = 200
    c.train.eval_batch_size = 500
    c.train.checkpoint_every = 2000
    return apply_method_row(c, row, ng_lr=2000.0)
