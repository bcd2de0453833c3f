"""Joint intent + slot parsing: the model and ``Parser`` (``model``), ``metrics``, ``finetune``, ``evaluate``.

    from atm_ray.nlu import Parser
    Parser("runs/tiny/finetune_student/export").parse(["set an alarm for 7 am"])

The joint model is registered with transformers' Auto classes on ``import atm_ray`` (see
``atm_ray.hf_auto``), so that ``AutoModel.from_pretrained(export)`` loads it without ``trust_remote_code``.
"""

from atm_ray.nlu.model import Parser, RobertaPreLayerNormForIntentAndSlots

__all__ = ["Parser", "RobertaPreLayerNormForIntentAndSlots"]
