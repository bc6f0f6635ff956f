"""``RLOOConfig`` over the schema (schema.py): values coerced to each field's type, TRL's other names for a
field, where each value came from, fields rloo does not have yet refused by name, presets and YAML files.

The field names are the CLI options (``--learning_rate 3e-6``) and the keys of the YAML presets in
``rloo/configs/``; ``resolve()`` (sizes.py) validates them and derives the batch sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from rloo.files import parse_yaml, read_utf8
from rloo.schema import SECRET_FIELDS, SECTIONS

DEFAULT_PRESET = "tldr-tiny"


# Other names a TRL or transformers config uses for a field (read, never written).
ALIASES = {"dtype": "torch_dtype", "dataset_test_split": "dataset_eval_split"}


class Schema:
    """A stage's fields: its sections (dataclasses of fields), which section holds each field, and the TRL /
    transformers fields it does not have yet (with what to do instead)."""

    def __init__(self, sections: dict[str, type], not_yet: dict[str, str]) -> None:
        self.sections, self.not_yet = sections, not_yet
        self.field_section = {f.name: s for s, cls in sections.items() for f in dataclasses.fields(cls)}


class Config:
    """All options of one stage's run, over its ``SCHEMA``: ``RLOOConfig`` (``rloo train``), ``SFTConfig``
    (``rloo sft``). Flat field names (``RLOOConfig(learning_rate=3e-6)``, as TRL's configs), the sections as
    attributes, ``origins``: where each value that is not the library default came from ("preset
    tldr-tiny", "file run.yaml", "flag", "given", "checkpoint"), printed at the start of a run (``describe``)."""

    SCHEMA: Schema

    def __init__(self, **values: Any) -> None:
        for name, cls in self.SCHEMA.sections.items():
            object.__setattr__(self, name, cls())
        object.__setattr__(self, "sizes", None)
        object.__setattr__(self, "origins", {})
        self.update(values, "given")

    def update(self, values: dict[str, Any], origin: str = "given") -> "Config":
        for key, value in values.items():
            if key in self.SCHEMA.sections and isinstance(value, dict):
                self.update(value, origin)
            else:
                self.set(key, value, origin)
        return self

    def set(self, name: str, value: Any, origin: str) -> None:
        name = ALIASES.get(name, name)
        section = self.SCHEMA.field_section.get(name)
        if section is None:
            raise ValueError(unknown_key_message(name, self.SCHEMA))
        setattr(object.__getattribute__(self, section), name, coerce(name, value, self.SCHEMA))
        self.origins[name] = origin

    def __getattr__(self, name: str) -> Any:
        section = type(self).SCHEMA.field_section.get(ALIASES.get(name, name))
        if section is None:
            raise AttributeError(f"{type(self).__name__} has no field '{name}'")
        return getattr(object.__getattribute__(self, section), ALIASES.get(name, name))

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value, self.origins.get(ALIASES.get(name, name), "given"))

    def __deepcopy__(self, memo: dict) -> "Config":
        copied = type(self)()
        for name in self.SCHEMA.sections:
            object.__setattr__(copied, name, copy.deepcopy(object.__getattribute__(self, name), memo))
        object.__setattr__(copied, "origins", dict(self.origins))
        object.__setattr__(copied, "sizes", self.sizes)
        return copied

    def to_dict(self) -> dict[str, Any]:
        """Flat {field: value}, the YAML written to the run folder: never the Hub token (the folder is uploaded)."""
        return {f: None if f in SECRET_FIELDS else getattr(self, f) for f in self.SCHEMA.field_section}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def describe(self) -> str:
        """Every field with its value, grouped by where it came from (printed at the start of a run)."""
        groups: dict[str, list[str]] = {}
        for name, value in self.to_dict().items():
            groups.setdefault(self.origins.get(name, "default"), []).append(f"{name}={value!r}")
        order = sorted(groups, key=lambda origin: (origin == "default", origin))
        return "\n".join(f"  {origin}: {', '.join(items)}" for origin, items in ((o, groups[o]) for o in order))


def check_stage(cfg: Config, stage: str, extra: list[tuple[bool, str]]) -> None:
    """A supervised stage's checks (``rloo sft``, ``rloo reward-model``): the shared fields', then ``extra``;
    the first that fails is raised as one line naming the field."""
    from rloo.sizes import evaluation_checks  # as resolve imports sizes: lazily

    checks = [
        (cfg.max_length is None or cfg.max_length >= 2, "max_length must be >= 2 or None"),
        (cfg.learning_rate > 0, "learning_rate must be > 0"),
        (cfg.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (cfg.max_steps > 0 or cfg.num_train_epochs > 0, "max_steps or num_train_epochs must be > 0"),
        (cfg.logging_steps >= 1, "logging_steps must be >= 1"),
        (cfg.save_steps >= 0, "save_steps must be >= 0 (0 = no checkpoints)"),
        (cfg.num_eval_samples >= 0, "num_eval_samples must be >= 0"),
        (cfg.save_strategy in ("steps", "no"), f"save_strategy must be steps or no, got {cfg.save_strategy!r}"),
        (not cfg.use_peft and not (cfg.load_in_4bit or cfg.load_in_8bit),
         f"use_peft / load_in_4bit / load_in_8bit: rloo {stage} trains the whole model for now"),
        (not cfg.log_completions, f"log_completions: rloo {stage} generates no completions"),
        *evaluation_checks(cfg),
        *extra,
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.save_strategy == "no" and cfg.save_steps:
        cfg.set("save_steps", 0, "save_strategy")


# TRL / transformers fields rloo does not have yet, with what to do instead.
_EVAL = ("rloo evaluates one sampled completion for each of num_eval_samples held-out prompts (eval_strategy steps "
         "with eval_steps: periodically)")
NOT_YET = {
    "use_cpu": "not needed: rloo uses the GPU when there is one and the CPU otherwise",
    "do_eval": _EVAL, "per_device_eval_batch_size": _EVAL, "num_generations_eval": _EVAL,
    "logging_strategy": "rloo writes one line of metrics every logging_steps steps",
    "use_liger_kernel": "not needed: rloo's log-prob pass never holds (B, T, V) logits",
}


class RLOOConfig(Config):
    """All options of an RLOO run (``rloo train``). ``RLOOConfig(learning_rate=3e-6, num_generations=4)`` takes
    flat field names (as TRL's RLOOConfig does); ``cfg.model``, ``cfg.training``... hold the sections;
    ``cfg.learning_rate`` reads through."""

    SCHEMA = Schema(SECTIONS, NOT_YET)

    def resolve(self, num_processes: int = 1, num_train_rows: int | None = None):
        """Validate every field and compute the derived sizes (``rloo.sizes.Sizes``); errors are one line naming
        the field."""
        from rloo.sizes import resolve

        sizes = resolve(self, num_processes, num_train_rows)
        object.__setattr__(self, "sizes", sizes)
        return sizes


def unknown_key_message(key: str, schema: Schema | None = None) -> str:
    schema = schema or RLOOConfig.SCHEMA
    if key in schema.not_yet:
        return f"config field '{key}': {schema.not_yet[key]}"
    if key.startswith("lora_"):
        return f"config field '{key}': not a LoRA field of rloo's (lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_modules_to_save, lora_task_type)"
    close = difflib.get_close_matches(key, list(schema.field_section) + list(ALIASES), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config field '{key}'{hint}"


def field_type(name: str, schema: Schema | None = None) -> str:
    """The annotation of a field as a string ('int', 'list[float] | None', ...)."""
    schema = schema or RLOOConfig.SCHEMA
    cls = schema.sections[schema.field_section[name]]
    return str(next(f.type for f in dataclasses.fields(cls) if f.name == name))


def coerce(name: str, value: Any, schema: Schema | None = None) -> Any:
    """Convert a CLI/YAML value to the field's type, or raise one line naming the field."""
    kind = field_type(name, schema)
    if isinstance(value, list) and len(value) == 1 and str(value[0]).lower() in ("none", "null") and "None" in kind:
        value = None  # `--reward_weights none` on the command line
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind):
        if "None" in kind or value is None and kind.startswith("list"):
            return None if "None" in kind else []
        raise ValueError(f"{name}: expected {kind}, got None")
    if kind.split(" |")[0] == "dict":
        return _as_dict(name, value)
    try:
        if kind.startswith("list"):
            items = value if isinstance(value, (list, tuple)) else [value]
            if "float" in kind:
                return [float(v) for v in items]
            return [str(v) for v in items]
        base = kind.split(" |")[0]
        if base == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / yes (eval_strategy: no) as a boolean
            return "yes" if value else "no"
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind}, got {value!r}") from None


def _as_dict(name: str, value: Any) -> dict:
    """A dict field: a mapping, or its JSON text (``--generation_kwargs '{"top_k": 20}'``, as transformers parses)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: expected a JSON object such as '{{\"key\": 1}}', got {value!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: expected a mapping of keyword arguments, got {type(value).__name__}")
    # TRL's Python configs write dtypes as objects ({"dtype": torch.bfloat16}): kept by name, so the config
    # stays JSON and YAML for checkpoints and the run folder.
    value = {key: str(v).removeprefix("torch.") if type(v).__name__ == "dtype" else v for key, v in value.items()}
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: its values must be plain data (text, numbers, lists, mappings): {err}") from None
    return value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rloo.configs").iterdir() if p.name.endswith(".yaml"))


# Naming one of these means "my own run": it starts from the library defaults, not the default preset.
OWN_RUN_FIELDS = ("model_name_or_path", "dataset_name", "reward_funcs", "reward_model_name_or_path")


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None,
                origin: str = "given", config_class: type[Config] | None = None) -> Config:
    """A preset name (``tldr-tiny``) or a YAML file, then ``overrides`` (their ``origin``: "flag" from the CLI);
    unknown keys are errors. Without a name: the default preset, unless the overrides name a model, a
    dataset or rewards of their own, which start from the library defaults (TRL's where TRL has the field).
    ``config_class``: another stage's config (SFTConfig), which has no presets: a YAML file or the defaults."""
    overrides = overrides or {}
    config_class = config_class or RLOOConfig
    if config_class is not RLOOConfig:
        if name_or_path is None:
            return config_class().update(overrides, origin)
        if not Path(name_or_path).is_file():
            raise ValueError(f"--config '{name_or_path}': not a YAML file")
        values = parse_yaml(read_utf8(name_or_path), f"--config {name_or_path}") or {}
        if not isinstance(values, dict):
            raise ValueError(f"config '{name_or_path}': expected a mapping of field: value")
        return config_class().update(values, f"file {Path(name_or_path).name}").update(overrides, origin)
    if name_or_path is None and any(ALIASES.get(key, key) in OWN_RUN_FIELDS for key in overrides):
        return RLOOConfig().update(overrides, origin)
    name_or_path = name_or_path or DEFAULT_PRESET
    if name_or_path in preset_names():
        text = resources.files("rloo.configs").joinpath(f"{name_or_path}.yaml").read_text()
        preset, source = name_or_path, f"preset {name_or_path}"
    elif Path(name_or_path).is_file():
        text, preset, source = read_utf8(name_or_path), None, f"file {Path(name_or_path).name}"
    else:
        raise ValueError(f"--config '{name_or_path}': not a preset ({', '.join(preset_names())}) nor a YAML file")
    values = parse_yaml(text, f"--config {name_or_path}") or {}
    if not isinstance(values, dict):
        raise ValueError(f"config '{name_or_path}': expected a mapping of field: value")
    cfg = RLOOConfig().update(values, source)
    if preset and values.get("preset") is None:
        cfg.set("preset", preset, source)
    return cfg.update(overrides, origin)
