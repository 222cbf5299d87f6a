"""One logging set-up for the command line and the experiment's job processes: a time-stamped
format, and the libraries' chatter (fbgemm's per-kernel argument dumps at INFO, TorchRec's plans,
torch's advice to TorchRec's maintainers) kept out unless asked for."""

from __future__ import annotations

import logging
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# torch's notices about its own internals, which a user of ctnet-rec cannot act on, raised
# anew in every job's process: the deprecation of ShardedTensor, in which TorchRec keeps its
# table shards (every checkpoint save and load), and torch.package's use of TypedStorage
# (every artifact exported or loaded); (category, message)
LIBRARY_NOTICES = (
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor"),
    (UserWarning, "TypedStorage is deprecated"),
)


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
    for category, message in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_not_fbgemm_info)
