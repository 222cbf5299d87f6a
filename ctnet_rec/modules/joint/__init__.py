"""The joint-learning cross-domain baselines of the paper's Table 2 (one model per module)."""

from ctnet_rec.modules.joint.common import SOURCE, TARGET, JointModel
from ctnet_rec.modules.joint.dasl import DASL
from ctnet_rec.modules.joint.ddtcdr import DDTCDR
from ctnet_rec.modules.joint.minet import MiNet
from ctnet_rec.modules.joint.mlp_plus_plus import MLPPlusPlus
from ctnet_rec.modules.joint.ple import PLE
from ctnet_rec.modules.joint.share_bottom import ShareBottom

# the paper's names, in its order
JOINT_MODELS: dict[str, type[JointModel]] = {
    "MLP++": MLPPlusPlus,
    "Share Bottom": ShareBottom,
    "PLE": PLE,
    "MiNet": MiNet,
    "DDTCDR": DDTCDR,
    "DASL": DASL,
}

__all__ = ["JOINT_MODELS", "SOURCE", "TARGET", "JointModel"]
