"""`planc example tiny OUTDIR`: a few-MB Llama-style base and three real fine-tunes, in seconds.

Writes, in Hugging Face / PEFT formats:
- ``models/base``: trained for a few AdamW steps on general prose (GQA, untied embeddings);
- ``models/legal``: partial fine-tune — only the top layers and the head trained further on legal text;
- ``models/support``: full fine-tune on chat text;
- ``models/chat-lora``: a PEFT LoRA adapter (q/v/o/gate projections) trained on chat text;
- ``model.yaml`` naming them, and a byte-level BPE tokenizer trained on the three corpora.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from planc.errors import PlancError
from planc.example import corpus
from planc.models.config import parse_arch
from planc.models.llama import CausalLM
from planc.models.lora import LoRALinear
from planc.models.tokenizer import TOKENIZER_FILES
from planc.store import staging_dir

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                 "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


@dataclass
class TinyExample:
    """Sizes and training settings of the tiny example (all small enough for a few seconds on a CPU)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 48
    batch_size: int = 8
    base_steps: int = 30
    finetune_steps: int = 10
    lr: float = 3e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "gate_proj")
    partial_top_layers: int = 2
    seed: int = 0
    losses: dict[str, list[float]] = field(default_factory=dict)

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "dtype": "float32",
        }


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def write_tokenizer(tok, directory: Path, cfg: TinyExample) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": 256, "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }, indent=2, sort_keys=True) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, indent=2, sort_keys=True) + "\n")


def _batches(ids: torch.Tensor, cfg: TinyExample, gen: torch.Generator) -> Callable[[], torch.Tensor]:
    def sample() -> torch.Tensor:
        starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        return torch.stack([ids[s:s + cfg.seq_len + 1] for s in starts.tolist()])
    return sample


def train(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, steps: int,
          cfg: TinyExample, seed: int) -> list[float]:
    """A few real AdamW steps of next-token prediction; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    sample = _batches(ids, cfg, gen)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        batch = sample()
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_checkpoint(model: CausalLM, directory: Path, hf_config: dict, tokenizer_dir: Path | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                (directory / name).write_bytes((tokenizer_dir / name).read_bytes())


def _add_lora(model: CausalLM, cfg: TinyExample, gen: torch.Generator) -> dict[str, LoRALinear]:
    wrapped = {}
    for i, layer in enumerate(model.model.layers):
        for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for leaf in cfg.lora_targets:
                if not hasattr(parent, leaf):
                    continue
                base: nn.Linear = getattr(parent, leaf)
                a = torch.randn(cfg.lora_rank, base.in_features, generator=gen) / base.in_features ** 0.5
                b = torch.zeros(base.out_features, cfg.lora_rank)  # PEFT's init: the delta starts at zero
                lora = LoRALinear(base, a, b, cfg.lora_alpha / cfg.lora_rank)
                lora.lora_a.requires_grad_(True)
                lora.lora_b.requires_grad_(True)
                setattr(parent, leaf, lora)
                wrapped[f"model.layers.{i}.{parent_name}.{leaf}"] = lora
    return wrapped


def save_adapter(wrapped: dict[str, LoRALinear], directory: Path, cfg: TinyExample, base_name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, lora in wrapped.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora.lora_a.detach().contiguous().clone()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora.lora_b.detach().contiguous().clone()
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(cfg.lora_targets), "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }, indent=2, sort_keys=True) + "\n")


MODEL_YAML = """\
# The tiny example: one base and three fine-tunes of it, written by `planc example tiny`.
base: {name: base, path: ./models/base}
variants:
  - {name: legal, path: ./models/legal}          # partial fine-tune: top layers + head
  - {name: support, path: ./models/support}      # full fine-tune
  - {name: chat, adapter: ./models/chat-lora}    # PEFT LoRA adapter
backend: local
"""


def write_tiny_example(out: Path, cfg: TinyExample | None = None,
                       progress: Callable[[str], None] | None = None) -> TinyExample:
    """Write `out/models/` (staged, then renamed into place) and `out/model.yaml`; other files in
    `out` are left alone. Returns the settings with the training losses."""
    out = Path(out)
    models = out / "models"
    if out.exists() and not out.is_dir():
        raise PlancError(f"{out} exists and is not a directory")
    if models.exists() and any(models.iterdir()) and not (models / "base" / "config.json").is_file():
        raise PlancError(f"{models} exists and does not hold a planc example; refusing to replace it")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these matmuls are small: extra threads cost more than they give on a CPU
    try:
        with staging_dir(models, replace_check=False) as root:
            cfg = _write(root, cfg or TinyExample(), progress)
        (out / "model.yaml").write_text(MODEL_YAML)
        return cfg
    finally:
        torch.set_num_threads(threads)


def _write(models: Path, cfg: TinyExample, progress: Callable[[str], None] | None) -> TinyExample:
    """Train and write the four models into `models` (a staging directory)."""
    say = progress or (lambda _msg: None)
    torch.manual_seed(cfg.seed)
    texts = {"general": corpus.general(1500), "legal": corpus.legal(1000), "chat": corpus.chat(700)}
    tok = train_tokenizer(texts.values(), cfg.vocab_size)
    ids = {k: torch.tensor(tok.encode(v, add_special_tokens=False).ids) for k, v in texts.items()}
    tok_dir = models / "base"
    write_tokenizer(tok, tok_dir, cfg)
    hf = cfg.hf_config()
    arch = parse_arch(hf, "tiny config")

    say("training base")
    base = CausalLM(arch)
    _init(base, cfg.seed)
    cfg.losses["base"] = train(base, list(base.parameters()), ids["general"], cfg.base_steps, cfg, cfg.seed)
    save_checkpoint(base, models / "base", hf)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    say("partial fine-tune (legal)")
    legal = _copy(arch, base_state)
    top = [legal.model.layers[i] for i in range(cfg.num_layers - cfg.partial_top_layers, cfg.num_layers)]
    params = [p for m in top + [legal.model.norm, legal.lm_head] for p in m.parameters()]
    cfg.losses["legal"] = train(legal, params, ids["legal"], cfg.finetune_steps, cfg, cfg.seed + 1)
    save_checkpoint(legal, models / "legal", {**hf, "_name_or_path": "tiny-legal"}, tok_dir)

    say("full fine-tune (support)")
    support = _copy(arch, base_state)
    cfg.losses["support"] = train(support, list(support.parameters()), ids["chat"], cfg.finetune_steps, cfg,
                                  cfg.seed + 2)
    save_checkpoint(support, models / "support", {**hf, "_name_or_path": "tiny-support"}, tok_dir)

    say("LoRA adapter (chat)")
    lora_model = _copy(arch, base_state).requires_grad_(False)
    wrapped = _add_lora(lora_model, cfg, torch.Generator().manual_seed(cfg.seed + 3))
    params = [p for w in wrapped.values() for p in (w.lora_a, w.lora_b)]
    cfg.losses["chat"] = train(lora_model, params, ids["chat"], cfg.finetune_steps, cfg, cfg.seed + 3)
    save_adapter(wrapped, models / "chat-lora", cfg, "../base")

    return cfg


def _init(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _copy(arch, state: dict[str, torch.Tensor]) -> CausalLM:
    model = CausalLM(arch)
    model.load_state_dict({k: v.clone() for k, v in state.items()})
    return model
