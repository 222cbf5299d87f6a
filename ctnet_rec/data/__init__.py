"""Data: the Parquet contract, id mapping, the synthetic world and the batch reader."""
