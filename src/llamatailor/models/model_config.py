"""A model's config.json where transformers cannot load it as its publisher wrote it."""

from typing import Any

from transformers import AutoConfig, PretrainedConfig


def corrected_config(location: str, hub_kwargs: dict[str, Any] | None = None) -> PretrainedConfig | None:
    """The config of the model at `location` (a folder or hub id), corrected, when its config.json cannot be
    loaded as written; None when it can (transformers then reads the file itself).

    Meta's Llama 4 releases write `attn_temperature_tuning: 4` (an int, the flag of Meta's reference code), and
    transformers 5.23 declares a bool and refuses the whole file, for models and tokenizers alike. Any positive
    value turns the tuning on in both implementations, so it is read as `> 0` (as vLLM reads it).

    Raises:
        OSError: no config.json at `location` (transformers' own error, as from_pretrained raises it).
    """
    data, _ = PretrainedConfig.get_config_dict(location, **(hub_kwargs or {}))
    text = data.get("text_config", data)
    value = (
        text.get("attn_temperature_tuning") if str(data.get("model_type", "")).startswith("llama4") else None
    )
    if value is None or isinstance(value, bool):
        return None
    text["attn_temperature_tuning"] = bool(value > 0)
    return AutoConfig.for_model(**data)
