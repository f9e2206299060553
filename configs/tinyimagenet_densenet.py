"""DenseNet-BC-100 (k=12) on Tiny ImageNet (64x64, 200 classes).

    python scripts/train.py --config=configs/tinyimagenet_densenet.py
    python scripts/train.py --config=configs/tinyimagenet_densenet.py:vanilla

The argument is a Table-1 method row.  Tiny ImageNet is a manual download:
unzip ``tiny-imagenet-200.zip`` into the data directory (the validation set,
which has labels, is the test split).  Huang et al.'s recipe (SGD + Nesterov,
batch 64, weight decay 1e-4) with cosine annealing, warm-up and the paper's
augmentation.
"""

from dualflow.train.config import apply_method_row, base_config


def get_config(row: str = "bp_nf_ng"):
    c = base_config()
    c.dataset = "tiny_imagenet"
    c.model.name = "densenet_bc100"
    c.model.kwargs.init_var = 1e-3
    c.model.kwargs.prior_var = 2.0
    c.loss.kl_weight = 1.0
    c.loss.kl_anneal_steps = 5 * 1562
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip = 5.0
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 5 * 1562
    c.augment.crop_pad = 8
    c.augment.flip = True
    c.augment.randaugment_ops = 2
    c.augment.randaugment_magnitude = 9.0
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.train.batch_size = 64
    c.train.num_epochs = 100
    c.train.eval_batch_size = 500
    c.train.checkpoint_every = 5000
    return apply_method_row(c, row, ng_lr=2000.0)
