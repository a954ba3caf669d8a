"""One expert, no network: model presets, objectives, shard data, the trainer, checkpoints and export."""
