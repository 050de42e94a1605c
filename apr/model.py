"""Model presets: the Llama shape of the paper, built from config, saved as safetensors.

A saved model directory holds config.json, model.safetensors, generation_config.json and the
tokenizer files: `AutoModelForCausalLM` / `AutoTokenizer` load it, and it is what SGLang's
`--model-path` expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from apr import atomic
from apr import tokenizer as domain_tokenizer
from apr.config import InputError
from apr.countdown.threads import STYLE_NAMES


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096


# The paper's model is Llama-2 shaped: hidden 1024, 18 layers, 16 heads, MLP 2752, untied
# embeddings, 4096-token context (arXiv 2504.15466, Section 4.1). `small` fits one GPU's
# minutes; `tiny` (under 2M parameters) trains on a CPU in tests.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=344),
    "small": Shape(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   intermediate_size=1376),
    "paper": Shape(hidden_size=1024, num_hidden_layers=18, num_attention_heads=16,
                   intermediate_size=2752),
}


def shape(preset: str) -> Shape:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def llama_config(preset: str, context: int | None = None):
    """A `transformers.LlamaConfig` for a preset over the domain tokenizer's vocabulary."""
    from transformers import LlamaConfig

    s = shape(preset)
    tok = domain_tokenizer.build()
    ids = {name: tok.token_to_id(token) for name, token in (
        ("bos", domain_tokenizer.BOS), ("eos", domain_tokenizer.EOS), ("pad", domain_tokenizer.PAD))}
    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_attention_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=context or s.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )


def build(preset: str, context: int | None = None, seed: int = 0):
    """A freshly initialised `LlamaForCausalLM` (weights depend only on `seed`)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(preset, context)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def parameter_count(model, embeddings: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    if not embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total


def _quiet_transformers() -> None:
    """Saving and loading run many times in GRPO: no progress bar each time."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


ORIGIN = "origin.json"  # how a saved model was trained: stage, traces, step, what it started from


def save(model, directory: str | Path, origin: dict | None = None) -> Path:
    """Write an HF model directory (safetensors + tokenizer, and `origin` when given: how it
    was trained, so a report can name it), atomically: temp dir, then rename."""
    _quiet_transformers()
    directory = Path(directory)
    with atomic.partial_dir(directory, replace="config.json") as partial:
        model.save_pretrained(partial, safe_serialization=True)
        domain_tokenizer.save(partial, model_max_length=model.config.max_position_embeddings)
        if origin is not None:
            (partial / ORIGIN).write_text(json.dumps(origin, indent=1) + "\n")
    return directory


def origin(directory: str | Path) -> dict | None:
    """The `origin` a model was saved with, or None (not recorded, or not readable)."""
    try:
        return json.loads((Path(directory) / ORIGIN).read_text())
    except (OSError, ValueError):
        return None


def describe(directory: str | Path | None) -> str:
    """A model in words, from its origin: "SFT on APR traces, step 40", "GRPO step 2 from ..."."""
    if directory is None:
        return "none"
    return _describe(origin(directory)) or Path(directory).name


def _describe(record: dict | None) -> str:
    if not record:
        return ""
    if record.get("stage") == "sft":
        style = STYLE_NAMES.get(record.get("traces"), record.get("traces"))
        return f"SFT on {style} traces ({record.get('shape')} shape), step {record.get('step')}"
    if record.get("stage") == "grpo":
        start = _describe(record.get("from")) or "an SFT model"
        return f"GRPO step {record.get('step')} from {start}"
    return str(record.get("stage", ""))

def sampled_logprobs(logits, targets, temperature: float):
    """log_softmax(logits / temperature) at each target token, in float32: the convention of
    the log-probs SGLang reports, so the engines and the GRPO trainer score tokens alike."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


class ModelError(InputError):
    """A model directory that cannot be loaded: a missing, truncated or corrupt file."""


WEIGHTS = "model.safetensors"
HINT = "point at a complete `model/` directory that `apr sft` or `apr grpo` writes"


def check_directory(directory: str | Path) -> Path:
    """The model directory, once its files are there and whole; else a ModelError naming
    the file (before a loader deep in transformers fails with a traceback)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory} is not a model directory (no config.json): {HINT}")
    try:
        json.loads((directory / "config.json").read_text())
    except (ValueError, OSError) as e:
        raise ModelError(f"{directory}/config.json is not readable JSON ({e}): {HINT}") from None
    if not (directory / "tokenizer.json").is_file():
        raise ModelError(f"{directory} has no tokenizer.json: {HINT}")
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{directory} has no {WEIGHTS}: {HINT}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:  # reads and checks the header only
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{weights} is truncated or corrupt ({e}): {HINT}") from None
    return directory


def positions(directory: str | Path) -> int:
    """The longest sequence the model was built for (`max_position_embeddings`)."""
    config = json.loads((check_directory(directory) / "config.json").read_text())
    value = config.get("max_position_embeddings")
    if not isinstance(value, int) or value < 1:
        raise ModelError(f"{directory}/config.json has no max_position_embeddings: {HINT}")
    return value


def load(directory: str | Path, device: str = "cpu", dtype=None):
    """Load a saved model directory (safetensors only: nothing is unpickled)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    directory = check_directory(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:  # a config transformers cannot build from
        raise ModelError(f"{directory}: cannot load the model ({_first_line(e)}): {HINT}") from None
    return model.to(device)


def load_tokenizer(directory: str | Path):
    """The model's tokenizer, through `AutoTokenizer` (as SGLang loads it)."""
    from transformers import AutoTokenizer

    directory = check_directory(directory)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception on bad JSON
        raise ModelError(f"{directory}/tokenizer.json cannot be read ({_first_line(e)}): "
                         f"{HINT}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
