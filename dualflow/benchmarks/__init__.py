"""Benchmarks that compare learning methods under published protocols."""

from dualflow.benchmarks.uci import UCI_METHODS, MethodSpec, method_spec, run_uci_group
from dualflow.benchmarks.uci_run import run_uci_benchmark
from dualflow.benchmarks.uci_search import run_search_group, search_methods

__all__ = [
    "UCI_METHODS",
    "MethodSpec",
    "method_spec",
    "run_search_group",
    "run_uci_benchmark",
    "run_uci_group",
    "search_methods",
]
