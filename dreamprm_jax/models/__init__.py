"""Models: Qwen2-VL (:mod:`.qwen2_vl`) and the process reward model on top of it (:mod:`.prm`).

    from dreamprm_jax.models import Qwen2VL, ProcessRewardModel   # Flax NNX modules
    from dreamprm_jax.models import qwen2_vl, prm                 # the functional API
"""

from . import prm, qwen2_vl
from .prm import ProcessRewardModel
from .qwen2_vl.modules import Qwen2VL

__all__ = ["ProcessRewardModel", "Qwen2VL", "prm", "qwen2_vl"]
