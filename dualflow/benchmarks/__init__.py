"""Benchmarks that compare learning methods under published protocols."""

from dualflow.benchmarks.uci import UCI_METHODS, MethodSpec, method_spec, run_uci_group

__all__ = ["UCI_METHODS", "MethodSpec", "method_spec", "run_uci_group"]
