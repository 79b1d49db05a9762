"""GPT-2 traffic classifier: presets or local checkpoints, two heads, one output shape.

`build_model(model_cfg, label_names, tokenizer)` returns a `TrafficClassifier` whose
`forward(input_ids, attention_mask, labels=None)` gives `ClassifierOutput(loss, logits[B, num_labels])` for
both heads, `seqcls` and `causal-lm` (every label's answer scored exactly, in one packed pass). Model
sources, the two heads, the causal-lm scoring and class-weighted losses: docs/model.md.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cic_gpt2.errors import CicError, ConfigError

HEADS = ("seqcls", "causal-lm")
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),
    "small": dict(n_layer=4, n_embd=256, n_head=4),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
HUB_REPOS = {name: [name, f"openai-community/{name}"] for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}

# causal-lm prompt. The prefix ends and the suffix starts with a newline so that GPT-2's pre-tokenizer
# splits there: ids(prefix) + ids(row) + ids(suffix) + ids(" label") == ids(prefix + row + suffix + " label").
PROMPT_PREFIX = "Network flow:\n"
PROMPT_SUFFIX = "\nTraffic class:"
ANSWER_PREFIX = " "


class ClassifierOutput(NamedTuple):
    loss: Optional[torch.Tensor]
    """Scalar mean over the batch (of w_label * loss with class weights) when labels are given, else None."""
    logits: Optional[torch.Tensor]
    """[batch, num_labels] class scores (seqcls logits; causal-lm answer log-likelihoods); None only for
    causal-lm in training mode with labels."""


# --------------------------------------------------------------------------------------------------
# Where the weights come from
# --------------------------------------------------------------------------------------------------
def _hub_cache_dir() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def resolve_model_dir(name: str) -> Path:
    """A local model directory for `name` (a directory, or a name already in the local HF cache). Never
    downloads; a missing name is a CicError that says how to fetch it on a login node."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CicError(f"model directory {path} has no config.json; pass a Hugging Face model directory")
        return path
    if path.exists() or os.sep in name or name.startswith("."):
        raise CicError(f"model.name={name}: no such model directory")
    from huggingface_hub import snapshot_download

    for repo in HUB_REPOS.get(name, [name]):
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except (OSError, ValueError):  # LocalEntryNotFoundError (not cached), HFValidationError (not a repo id)
            continue
    repo = HUB_REPOS.get(name, [name])[-1]
    raise CicError(
        f"model {name!r} is not a local directory and not in the Hugging Face cache ({_hub_cache_dir()}); compute "
        f"nodes never download. On a login node with internet: `hf download {repo} --local-dir models/{name}` "
        f"(older huggingface_hub: `huggingface-cli download {repo} --local-dir models/{name}`), then pass "
        f"model.name=models/{name}" + (" [HF_HUB_OFFLINE=1]" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
    )


def model_source(model_cfg) -> tuple[str, Optional[Path]]:
    """("preset", None) for random init from a preset, ("dir", path) when weights are loaded."""
    name = model_cfg.name
    if name in PRESETS and not model_cfg.pretrained:
        return "preset", None
    if name in PRESETS and name not in HUB_REPOS:
        raise ConfigError(f"model.name={name} is a random-init preset with no pretrained weights; "
                          f"set model.pretrained=false or pick gpt2 / gpt2-medium / gpt2-large / gpt2-xl")
    return "dir", resolve_model_dir(name)


def build_hf_config(model_cfg, label_names: list[str], tokenizer=None):
    """The GPT2Config of the model (no weights), with the head's label maps, pad id and dropout override.
    A preset's vocabulary is GPT-2's, or `tokenizer`'s when it is another (the binned template's words)."""
    from transformers import GPT2Config

    kind, path = model_source(model_cfg)
    if kind == "preset":
        vocab, eos = GPT2_VOCAB_SIZE, GPT2_EOS_ID
        if tokenizer is not None and is_word_level(tokenizer):
            vocab, eos = len(tokenizer), tokenizer.eos_token_id
        config = GPT2Config(vocab_size=vocab, n_positions=1024, bos_token_id=eos, eos_token_id=eos,
                            **PRESETS[model_cfg.name])
    else:
        config = _config_from_dir(path)
    config.num_labels = len(label_names)
    config.id2label = {i: n for i, n in enumerate(label_names)}
    config.label2id = {n: i for i, n in enumerate(label_names)}
    eos = config.eos_token_id if config.eos_token_id is not None else GPT2_EOS_ID
    config.pad_token_id = eos
    if model_cfg.dropout is not None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = float(model_cfg.dropout)
    config._attn_implementation = "sdpa"  # causal-lm scoring passes a 4-D mask: sdpa/eager take it, flash does not
    return config


def _config_from_dir(path: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "gpt2":
        raise CicError(f"{path} holds a {config.model_type!r} model; cic-gpt2 trains GPT-2 models only")
    return config


# --------------------------------------------------------------------------------------------------
# Tokenizer agreement
# --------------------------------------------------------------------------------------------------
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fingerprint(tokenizer) -> str:
    from cic_gpt2.tokenizer import tokenizer_fingerprint

    if tokenizer not in _FINGERPRINTS:
        _FINGERPRINTS[tokenizer] = tokenizer_fingerprint(tokenizer)
    return _FINGERPRINTS[tokenizer]


def is_word_level(tokenizer) -> bool:
    """True for the binned template's word-level tokenizer (one id per bin word, no BPE merges)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "model", None)).__name__ == "WordLevel"


def load_model_tokenizer(model_cfg, manifest: Optional[dict] = None):
    """The tokenizer the model's token ids mean: the bundled GPT-2 BPE for presets (or, trained from scratch
    on binned data, that data's word-level tokenizer), else the model dir's own tokenizer files (the bundled
    GPT-2 BPE when the dir has none, as in a bare GPT-2 checkpoint)."""
    from cic_gpt2.tokenizer import dataset_tokenizer, load_tokenizer

    kind, path = model_source(model_cfg)
    if kind == "dir" and any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return load_tokenizer(str(path))
    if kind == "preset" and manifest and manifest.get("binning"):
        return dataset_tokenizer(manifest)
    return load_tokenizer(None)


def check_model_tokenizer(model_cfg, tokenizer) -> None:
    """Refuse a tokenizer (the dataset's) whose ids mean other words than the model's. A preset (random init)
    learns any word-level vocabulary; pretrained weights know GPT-2's BPE, not bin words."""
    from cic_gpt2.tokenizer import tokenizer_source

    if is_word_level(tokenizer):
        kind, _ = model_source(model_cfg)
        if kind == "preset" and model_cfg.head == "seqcls":
            return
        if kind == "preset":
            raise ConfigError("the binned template's bin words have no label words to score: train it with "
                              "model.head=seqcls (causal-lm needs a BPE text template)")
        raise CicError(f"the data uses the binned template (bin words, not text) but model {model_cfg.name} is "
                       f"pretrained on GPT-2 BPE text; binned is for from-scratch presets (tiny, small, ...): "
                       f"prepare the data with --template compact (or another text template) for this model")
    model_tok = load_model_tokenizer(model_cfg)
    if fingerprint(model_tok) != fingerprint(tokenizer):
        raise CicError(
            f"tokenizer mismatch: the data's tokenizer is {fingerprint(tokenizer)} ({tokenizer_source(tokenizer)}) "
            f"but model {model_cfg.name}'s tokenizer is {fingerprint(model_tok)} ({tokenizer_source(model_tok)}); "
            f"prepare the data again with `cic-gpt2 prepare ... --tokenizer {model_cfg.name}` or pick the model "
            f"the data was prepared for"
        )


# --------------------------------------------------------------------------------------------------
# causal-lm prompt: tokenized once
# --------------------------------------------------------------------------------------------------
def prompt_spec(tokenizer, label_names: list[str]) -> dict:
    """The causal-lm prompt as text and ids (stored in exports so the model can be used without cic-gpt2)."""
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return {
        "prompt_prefix": PROMPT_PREFIX,
        "prompt_suffix": PROMPT_SUFFIX,
        "answer_prefix": ANSWER_PREFIX,
        "answer_suffix": "eos",
        "prefix_ids": ids(PROMPT_PREFIX),
        "suffix_ids": ids(PROMPT_SUFFIX),
        "answer_ids": [ids(ANSWER_PREFIX + name) + [eos] for name in label_names],
        "eos_token_id": eos,
    }


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------
class TrafficClassifier(nn.Module):
    def __init__(self, hf_model: nn.Module, head: str, label_names: list[str], prompt: Optional[dict] = None,
                 class_weights=None):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"model.head={head!r} is not one of {', '.join(HEADS)}")
        self.hf_model = hf_model
        self.head = head
        self.label_names = list(label_names)
        self.prompt = prompt
        if class_weights is not None and len(class_weights) != len(label_names):
            raise CicError(f"{len(class_weights)} class weights for {len(label_names)} labels")
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        if head == "causal-lm":
            if prompt is None:
                raise ValueError("the causal-lm head needs its prompt spec (prompt_spec())")
            answers = prompt["answer_ids"]
            if len(answers) != len(label_names):
                raise CicError(f"the causal-lm prompt has {len(answers)} answers for {len(label_names)} labels")
            fed = [a[:-1] for a in answers]  # the last answer token is predicted, never fed
            self.max_fed = max(len(f) for f in fed)
            self.register_buffer("prefix_ids", torch.tensor(prompt["prefix_ids"], dtype=torch.long), persistent=False)
            self.register_buffer("suffix_ids", torch.tensor(prompt["suffix_ids"], dtype=torch.long), persistent=False)
            # Every label's answer packed side by side: fed token, its slot (label), offset, the token it predicts.
            self.register_buffer("all_fed", torch.tensor([t for f in fed for t in f]), persistent=False)
            self.register_buffer("all_slot", torch.tensor([c for c, f in enumerate(fed) for _ in f]), persistent=False)
            self.register_buffer("all_off", torch.tensor([j for f in fed for j in range(len(f))]), persistent=False)
            self.register_buffer("all_next", torch.tensor([t for a in answers for t in a[1:]]), persistent=False)
            self.register_buffer("first_ids", torch.tensor([a[0] for a in answers]), persistent=False)
            # One answer per example (training): [num_labels, max_fed] tables indexed by the label.
            pad = lambda rows, v: [r + [v] * (self.max_fed - len(r)) for r in rows]  # noqa: E731
            self.register_buffer("one_fed", torch.tensor(pad(fed, prompt["eos_token_id"])), persistent=False)
            self.register_buffer("one_next", torch.tensor(pad([a[1:] for a in answers], -100)), persistent=False)
            self.register_buffer("one_valid", torch.tensor(pad([[True] * len(f) for f in fed], False)),
                                 persistent=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def max_row_tokens(self) -> int:
        """Most row tokens one forward pass takes: the model's positions, less the causal-lm prompt and the
        longest answer (its last token is predicted, not fed)."""
        positions = int(self.hf_model.config.n_positions)
        if self.head == "causal-lm":
            positions -= len(self.prefix_ids) + len(self.suffix_ids) + self.max_fed
        return positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> ClassifierOutput:
        if input_ids.shape[1] > self.max_row_tokens:  # shapes only: no host sync
            extra = " (after the causal-lm prompt and answers)" if self.head == "causal-lm" else ""
            raise CicError(
                f"a batch of {input_ids.shape[1]} tokens per row does not fit the model's "
                f"{self.hf_model.config.n_positions} positions{extra}; set data.max_length <= {self.max_row_tokens} "
                f"(rounded down to a multiple of data.pad_to_multiple_of)"
            )
        if self.head == "seqcls":
            logits = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            loss = self._mean_loss(logits.float(), labels) if labels is not None else None
            return ClassifierOutput(loss, logits)
        if self.training and labels is not None:
            scores = self._answer_scores(input_ids, attention_mask, labels)  # [B, 1]: the true answer only
            return ClassifierOutput(self._mean_loss(scores, labels), None)
        scores = self._answer_scores(input_ids, attention_mask, None)
        loss = self._mean_loss(scores.gather(1, labels[:, None]), labels) if labels is not None else None
        return ClassifierOutput(loss, scores)

    def _mean_loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch loss: seqcls cross-entropy of the logits [B, C], causal-lm -log p of the true answer
        ([B, 1] scores). With class weights mean(w_label * loss), divided by the batch size and not by the
        batch's weight sum, which would make a micro-batch's share of the step depend on how the global batch
        is split (the weights are scaled so that an example's expected weight is 1:
        `cic_gpt2.data.class_weights`)."""
        weight = None if self.class_weights is None else self.class_weights.float()
        if self.head == "seqcls":
            if weight is None:
                return F.cross_entropy(scores, labels)
            return F.cross_entropy(scores, labels, weight=weight, reduction="none").mean()
        nll = -scores[:, 0]
        return nll.mean() if weight is None else (weight[labels] * nll).mean()

    # ---------------------------------------------------------------------------------------------- causal-lm
    def _answer_scores(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """[B, slots] log p(answer | prompt): every label's answer (labels None) or the true one ([B, 1])."""
        batch, width_ids = input_ids.shape
        device = input_ids.device
        n_prefix, n_suffix = len(self.prefix_ids), len(self.suffix_ids)
        if labels is None:
            n_block = len(self.all_fed)
            fed = self.all_fed.expand(batch, n_block)
            slot = self.all_slot.expand(batch, n_block)
            off = self.all_off.expand(batch, n_block)
            nxt = self.all_next.expand(batch, n_block)
            first = self.first_ids.expand(batch, self.num_labels)
        else:
            n_block = self.max_fed
            fed, nxt, valid = self.one_fed[labels], self.one_next[labels], self.one_valid[labels]
            slot = torch.where(valid, 0, -1)
            off = torch.arange(n_block, device=device).expand(batch, n_block)
            first = self.first_ids[labels][:, None]
        width_prompt = n_prefix + width_ids + n_suffix
        n_row = attention_mask.sum(dim=1)  # [B]
        prompt_len = n_prefix + n_row + n_suffix  # [B]
        prompt = torch.cat([self.prefix_ids.expand(batch, n_prefix), input_ids,
                            input_ids.new_full((batch, n_suffix), self.prompt["eos_token_id"])], dim=1)
        suffix_cols = n_prefix + n_row[:, None] + torch.arange(n_suffix, device=device)
        prompt = prompt.scatter(1, suffix_cols, self.suffix_ids.expand(batch, n_suffix))
        packed = torch.cat([prompt, fed], dim=1)  # [B, L]
        total = width_prompt + n_block
        cols = torch.arange(total, device=device)
        positions = torch.cat([cols[:width_prompt].expand(batch, width_prompt), prompt_len[:, None] + off], dim=1)

        # Who may attend to whom: prompt keys (valid ones, causally for prompt queries), own-answer keys
        # (causally), and every position itself (so padding rows never see an all-masked row).
        is_block = cols >= width_prompt
        causal = cols[None, :] <= cols[:, None]  # [L(query), L(key)]
        key_in_prompt = (cols[None, :] < prompt_len[:, None])  # [B, L]
        seg = torch.cat([torch.full((batch, width_prompt), -2, device=device, dtype=slot.dtype), slot], dim=1)
        allowed = key_in_prompt[:, None, :] & (causal | is_block[:, None])[None]
        allowed = allowed | ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & causal[None])
        allowed = allowed | torch.eye(total, dtype=torch.bool, device=device)[None]
        dtype = self.hf_model.transformer.wte.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

        hidden = self.hf_model.transformer(input_ids=packed, attention_mask=mask[:, None], position_ids=positions,
                                           use_cache=False).last_hidden_state
        lm_head = self.hf_model.lm_head
        last_prompt = hidden[torch.arange(batch, device=device), prompt_len - 1]  # [B, d]
        first_logp = torch.log_softmax(lm_head(last_prompt).float(), dim=-1)  # [B, V]
        scores = first_logp.gather(1, first)  # [B, slots]: the answers' first tokens
        block_logits = lm_head(hidden[:, width_prompt:]).float()  # [B, K, V]
        target = torch.where(slot >= 0, nxt, -100)
        nll = F.cross_entropy(block_logits.flatten(0, 1), target.flatten(), reduction="none", ignore_index=-100)
        return scores.scatter_add(1, slot.clamp(min=0), -nll.view(batch, n_block))


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
def build_model(model_cfg, label_names: list[str], tokenizer, *, load_weights: bool = True,
                class_weights=None) -> TrafficClassifier:
    """The classifier for `model_cfg` (see module docstring). Random init uses the caller's torch seed.

    `tokenizer`: the tokenizer of the data (refused when its fingerprint differs from the model's).
    `load_weights=False`: the architecture only, random init (the caller loads a state dict next).
    `class_weights`: one loss weight per label (`cic_gpt2.data.class_weights`), training only; None: unweighted."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    if model_cfg.head not in HEADS:
        raise ConfigError(f"model.head={model_cfg.head!r} is not one of {', '.join(HEADS)}")
    if len(label_names) < 2:
        raise ConfigError(f"a classifier needs at least 2 labels, the data has {len(label_names)}")
    check_model_tokenizer(model_cfg, tokenizer)
    config = build_hf_config(model_cfg, label_names, tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise CicError(f"the tokenizer has {len(tokenizer)} tokens but model {model_cfg.name} only {config.vocab_size}")
    cls = GPT2ForSequenceClassification if model_cfg.head == "seqcls" else GPT2LMHeadModel
    kind, path = model_source(model_cfg)
    if kind == "dir" and load_weights:
        # A score head saved for other labels (a different count) is re-initialised, not an error.
        hf_model = cls.from_pretrained(str(path), config=config, local_files_only=True, ignore_mismatched_sizes=True)
    else:
        hf_model = cls(config)
    hf_model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompt = prompt_spec(tokenizer, label_names) if model_cfg.head == "causal-lm" else None
    return TrafficClassifier(hf_model, model_cfg.head, label_names, prompt, class_weights)

