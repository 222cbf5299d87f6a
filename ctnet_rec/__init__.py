"""ctnet-rec: continual cross-domain CTR prediction with CTNet on TorchRec."""

from importlib.util import find_spec

__version__ = "0.2.0"  # the one place it is written: pyproject.toml reads it from here

# torchrec is not among the package's dependencies on a CPU machine (its metadata asks for
# the CUDA build of fbgemm-gpu): say what to install rather than fail deep inside an import
_missing = [name for name in ("torchrec", "fbgemm_gpu") if find_spec(name) is None]
if _missing:
    raise ImportError(
        f"ctnet-rec needs {' and '.join(_missing)}, not installed in this Python. On a GPU "
        "machine: pip install 'ctnet-rec[cuda]'. On a CPU machine: pip install "
        "'ctnet-rec[cpu]', then pip install --no-deps torchrec==1.9.2 (without --no-deps, "
        "torchrec's requirements replace fbgemm-gpu-cpu with the CUDA build). From a clone, "
        "`make setup` does either (docs/gpu.md, Set-up)")
