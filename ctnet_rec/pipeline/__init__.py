"""`ctnet pipeline`: the continual cross-domain loop of production, as one job."""
