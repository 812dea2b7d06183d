"""Experiments made of ordinary runs: several run folders trained, then compared in one report."""
