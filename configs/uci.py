"""UCI regression benchmark (the duality paper's Table 2), standard splits.

    python scripts/uci.py                                  # full table
    python scripts/uci.py --config.quick=True              # 3 small sets, 2 splits
    python scripts/uci.py --config.datasets=boston,yacht --config.methods=bp,ensemble

``quick`` runs boston, energy and yacht with bp, bp_het and ensemble on
splits 0 and 1 with a small step budget and two search candidates
(``dualflow.benchmarks.uci.QUICK``);
fields given explicitly on the command line win over it, e.g.
``--config.quick=True --config.datasets=yacht`` runs yacht only, quick budget.

Results are resumable (``<workdir>/results.json``); each record stores the
fingerprint of its data and split.  When the data changed since, the script
refuses; ``rerun_changed=True`` reruns exactly the records whose data changed.

Every field below applies to every method unless its name says otherwise.
Per data set, method and split, ``search_budget`` candidates of the declared
grid (``dualflow.benchmarks.uci_search.SPACE``; the fields below are the
first candidate) and the number of epochs are chosen on an inner validation
split of the training rows (see dualflow/benchmarks/uci_search.py).
"""

from dualflow.benchmarks.uci import default_config


def get_config():
    """``dualflow.benchmarks.uci.default_config()``: every field, documented there."""
    return default_config()
