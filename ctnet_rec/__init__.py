"""ctnet-rec: continual cross-domain CTR prediction with CTNet on TorchRec."""

__version__ = "0.1.0"
