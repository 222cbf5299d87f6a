"""The paper's experiments: run every compared model, then report."""
