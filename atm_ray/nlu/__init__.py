"""Joint intent + slot parsing: the model and ``Parser`` (``model``), ``metrics``, ``finetune``, ``evaluate``.

    from atm_ray.nlu import Parser
    Parser("runs/tiny/finetune_student/export").parse(["set an alarm for 7 am"])
"""

from atm_ray.nlu.model import Parser, RobertaPreLayerNormForIntentAndSlots

__all__ = ["Parser", "RobertaPreLayerNormForIntentAndSlots"]
