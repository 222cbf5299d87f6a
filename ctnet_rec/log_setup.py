"""One logging set-up for the command line and the experiment's job processes: a time-stamped
format, and the libraries' chatter (fbgemm's per-kernel argument dumps at INFO, TorchRec's plans,
torch's advice to TorchRec's maintainers) kept out unless asked for."""

from __future__ import annotations

import logging
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# torch's deprecation of ShardedTensor, in which TorchRec keeps its table shards: raised at
# every checkpoint save and load, in every process, and nothing a user of ctnet-rec can change
SHARDED_TENSOR_NOTICE = "Please use DTensor instead and we are deprecating ShardedTensor"


def _not_fbgemm_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "fbgemm_gpu" not in record.pathname


def configure_logging(level: int, quiet_libraries: bool = True) -> None:
    """Every handler of the root logger gets the format (a library may have installed one of
    its own before us) and, with `quiet_libraries`, the filters."""
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger().setLevel(level)
    if not quiet_libraries:
        return
    logging.getLogger("torchrec").setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=SHARDED_TENSOR_NOTICE, category=FutureWarning)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_not_fbgemm_info)
