"""Joint intent + slot parsing: the model and ``Parser`` (``model``), ``metrics``, ``finetune``, ``evaluate``.

    from atm_ray.nlu import Parser
    Parser("runs/tiny/finetune_student/export").parse(["set an alarm for 7 am"])

Importing this package registers the joint model with transformers' Auto classes, so that
``AutoModel.from_pretrained(export)`` loads it without ``trust_remote_code``. (Not on ``import atm_ray``:
registering needs the model class, so torch and transformers — even ``AutoConfig`` alone imports torch:
6–10 s on an idle 2-core machine, against 0.04 s for ``import atm_ray`` — paid by every process that
imports the package: the A/B ledger's replica, each Ray task and actor, ``atm-ray --help``.)
"""

from atm_ray.nlu.model import Parser, RobertaPreLayerNormForIntentAndSlots, register_auto_classes

register_auto_classes()

__all__ = ["Parser", "RobertaPreLayerNormForIntentAndSlots"]
