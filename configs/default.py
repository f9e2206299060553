"""Default job: a Bayesian MLP trained with belief propagation on scikit-learn digits.

    python scripts/train.py                      # this config
    python scripts/train.py --config.epochs=5    # override any field

Needs no download (the 1797 8x8 digits ship with scikit-learn).  Measured on a
2-core CPU: ~15-25 s, test accuracy 0.972, test NLL 0.118, ECE 0.036.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "sklearn_digits"  # the only offline dataset of this demo
    c.data_dir = ""  # unused by sklearn_digits; kept for the loaders to come
    c.test_fraction = 0.2  # held-out share (stratified, fixed by seed)

    c.hidden = (128, 128)  # hidden widths of the MLP
    c.activation = "relu"
    c.mode = "linearized"  # "linearized" (Algorithm 1) or "matched"
    c.backward = "bp"  # "bp" (custom_vjp smoothing rule) or "autodiff"
    c.head = "probit"  # categorical NLL: "probit" or "second_order"

    c.prior_var = 2.0  # prior N(0, prior_var / fan_in) on every weight (He scale)
    c.init_var = 1e-3  # initial posterior variance, times 1 / fan_in
    # beta in NLL + beta * KL / N.  beta = 1 (the true ELBO) under-fits this
    # 1437-example set with 26k weights (measured: acc 0.917, NLL 0.46, ECE 0.20
    # after 60 epochs); the Bayes-by-backprop report used beta = 1e-3.
    c.kl_weight = 0.1

    c.optimizer = "adam"
    c.lr = 3e-3
    c.epochs = 60
    c.batch_size = 64
    c.eval_every = 10  # epochs between progress lines
    c.progress = True  # tqdm progress bar
    return c
