"""adapterbench: bottleneck adapters, AdapterFusion, merging and their baselines, from one CLI."""

__version__ = "0.1.0"
