"""What a teacher folder a user brings must hold (``teachers.stage1`` / ``teachers.stage2``), checked before any
work starts: what ``save_pretrained`` writes for an ``AutoModelForMaskedLM`` and its tokenizer, read from disk
only, with safetensors weights only (loading a pickle can run code) and never with ``trust_remote_code``.
(Which stages such a teacher replaces, and the checks against the students, are ``atm_ray.train.teachers``.)
"""

from __future__ import annotations

import json
from pathlib import Path

from atm_ray.config import ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# from_pretrained's arguments for a folder we did not write: disk only, no pickles, no remote code
SAFE_LOADING = {"local_files_only": True, "use_safetensors": True, "trust_remote_code": False}


def check_teacher_folder(path: str, field: str) -> dict:
    """The folder's ``config.json`` after the checks; a ``ConfigError`` naming ``field`` otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is not a folder (a save_pretrained folder of a masked LM and its tokenizer)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{field}: {folder} has no config.json (a save_pretrained folder of a masked LM)")
    pickles = sorted(item.name for item in folder.iterdir() if item.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"{field}: {folder} holds pickled weights ({', '.join(pickles)}): atm-ray loads safetensors only, as "
            "loading a pickle can run code. Save the model again with save_pretrained() (safetensors is its "
            "default) into a folder without them"
        )
    try:
        model_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{field}: {config_file}, line {error.lineno}: not valid JSON ({error.msg})") from None
    code = sorted(item.name for item in folder.glob("*.py"))
    if code or "auto_map" in model_config:
        raise ConfigError(
            f"{field}: {folder} needs remote code ({', '.join(code) or 'auto_map in config.json'}): atm-ray never "
            "sets trust_remote_code; use a model whose architecture transformers ships"
        )
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{field}: {folder} has no *.safetensors weights")
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = model_config.get("model_type")
    if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{field}: {config_file}: model_type {model_type!r} is not a masked-LM architecture transformers "
            "ships (AutoModelForMaskedLM)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{field}: {folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the teacher's tokenizer "
            "with save_pretrained into the same folder"
        )
    return model_config


def load_teacher_tokenizer(path: str, field: str = "teachers.stage1"):
    from transformers import AutoTokenizer

    from atm_ray.data.tokenizer import SpecialTokens

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers raises many kinds; the user needs the folder and the cause
        raise ConfigError(f"{field}: the tokenizer in {path} does not load: {error}") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"{field}: the tokenizer in {path} is a slow (Python) tokenizer; atm-ray needs a fast one (tokenizer.json)")
    try:
        SpecialTokens.from_tokenizer(tokenizer)
    except ValueError as error:
        raise ConfigError(f"{field}: {path}: {error}") from None
    return tokenizer


def usable_positions(model_config: dict) -> int | None:
    """How long a row the model reads: RoBERTa-style position tables start after the padding id."""
    positions = model_config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    if model_config.get("model_type") in ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm"):
        return positions - int(model_config.get("pad_token_id") or 0) - 1
    return positions
