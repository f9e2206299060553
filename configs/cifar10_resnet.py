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

from dualflow.train.config import apply_method_row, base_config


def get_config(row: str = "bp_nf_ng"):
    c = base_config()
    c.dataset = "cifar10"
    c.model.name = "resnet20"
    c.model.kwargs.init_var = 1e-3
    c.model.kwargs.prior_var = 2.0
    c.loss.kl_weight = 1.0
    c.loss.kl_anneal_steps = 2000
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip = 5.0
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 390  # one epoch
    c.augment.crop_pad = 4
    c.augment.flip = True
    c.train.batch_size = 128
    c.train.num_epochs = 160
    c.train.eval_batch_size = 500
    c.method.num_samples = 1
    # natural-gradient rows: the mean step is v * grad with v ~ 1e-3 / fan_in,
    # so the rate is ~N times an SGD rate (see README, natural gradient)
    return apply_method_row(c, row, ng_lr=2000.0)
