"""Training engine: adapters, optimiser, LightningModule, strategies, checkpoints, the run."""
