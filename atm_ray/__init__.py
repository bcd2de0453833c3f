"""atm-ray: the Alexa Teacher Model recipe (pretrain, distil, fine-tune, serve) on Ray and DeepSpeed."""

import os

# Nothing is downloaded from a model hub: tokenizers are trained here and models built from config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

# AutoModel / AutoConfig load our exports without trust_remote_code, registered when transformers' Auto
# modules load (not here: registering imports torch, seconds that every Ray process would pay).
from atm_ray import hf_auto  # noqa: E402

hf_auto.install()
