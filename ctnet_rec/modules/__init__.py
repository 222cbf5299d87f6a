"""Model building blocks: embeddings, sequence attention, the MLP, and the single-domain tower.

Plain TorchRec modules (EmbeddingBagCollection, EmbeddingCollection) and nn.Modules only:
sharding is applied from outside, so the same module runs at 1 or N ranks."""
