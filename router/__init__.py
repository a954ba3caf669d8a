"""Partition, the router model, ensemble sampling, the aggregator and evaluation."""
