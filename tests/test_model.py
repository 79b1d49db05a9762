"""model.py: presets, sources, both heads, exact causal-lm scoring, tokenizer refusal, FLOPs."""
import copy

import numpy as np
import pytest
import torch

from cic_gpt2.config import DataConfig, ModelConfig
from cic_gpt2.data import rank_micro_batches, read_batch
from cic_gpt2.prepared import Prepared
from cic_gpt2.errors import CicError, ConfigError
from cic_gpt2.perf import flops_per_token
from cic_gpt2.model import (
    PRESETS, TrafficClassifier, build_hf_config, build_model,
)
from cic_gpt2.tokenizer import load_tokenizer

LABELS = ["Benign", "DDoS", "DoS", "Mirai", "Recon", "Spoofing", "Web", "BruteForce"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def val_batch(prepared_v2, tok):
    prepared = Prepared.load(prepared_v2)
    return read_batch(prepared.split("val"), list(range(6)), tok, DataConfig())


def build(tok, seed=0, class_weights=None, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{"dropout": 0.0, **kw}), LABELS, tok, class_weights=class_weights)


WEIGHTS = [0.5, 1.5, 2.0, 3.0, 0.25, 4.0, 0.0, 0.0]  # any positive weights; 0 for classes without rows
SPLITS_OF_4 = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]  # micro, accum, world


def test_presets_match_gpt2_shapes(tok):
    tiny = build_hf_config(ModelConfig(name="tiny"), LABELS)
    assert (tiny.n_layer, tiny.n_embd, tiny.n_head, tiny.n_positions, tiny.vocab_size) == (2, 64, 2, 1024, 50257)
    large = build_hf_config(ModelConfig(name="gpt2-large"), LABELS)
    assert (large.n_layer, large.n_embd, large.n_head) == (36, 1280, 20)
    assert set(PRESETS) == {"tiny", "small", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    m = build(tok)
    cfg = m.hf_model.config
    assert cfg.pad_token_id == tok.eos_token_id == 50256
    assert cfg.id2label[1] == "DDoS" and cfg.label2id["BruteForce"] == 7 and cfg.num_labels == 8
    assert cfg.resid_pdrop == cfg.attn_pdrop == cfg.embd_pdrop == 0.0
    assert build_hf_config(ModelConfig(name="tiny"), LABELS).resid_pdrop == 0.1  # GPT-2's own by default
    assert torch.equal(build(tok, seed=3).hf_model.score.weight, build(tok, seed=3).hf_model.score.weight)


def test_seqcls_reads_the_last_real_token_whatever_the_padding(tok, val_batch):
    m = build(tok).eval()
    with torch.no_grad():
        out = m(val_batch["input_ids"], val_batch["attention_mask"], val_batch["labels"])
        assert out.logits.shape == (6, 8) and out.loss.ndim == 0
        for i in range(3):
            n = int(val_batch["attention_mask"][i].sum())
            alone = m(val_batch["input_ids"][i:i + 1, :n], val_batch["attention_mask"][i:i + 1, :n]).logits
            torch.testing.assert_close(alone[0], out.logits[i], rtol=1e-5, atol=1e-5)


def test_causal_lm_prompt_ids_equal_whole_text_tokenization(tok, val_batch):
    m = build(tok, head="causal-lm")
    p = m.prompt
    for i in range(len(val_batch["labels"])):
        n = int(val_batch["attention_mask"][i].sum())
        row = val_batch["input_ids"][i, :n].tolist()
        text = tok.decode(row)
        assert tok(text)["input_ids"] == row
        for c, name in enumerate(LABELS):
            whole = tok(p["prompt_prefix"] + text + p["prompt_suffix"] + p["answer_prefix"] + name)["input_ids"]
            assert whole + [tok.eos_token_id] == p["prefix_ids"] + row + p["suffix_ids"] + p["answer_ids"][c]


def test_causal_lm_packed_scores_equal_scoring_each_label_alone(tok, val_batch):
    m = build(tok, head="causal-lm").eval()
    lm = m.hf_model
    with torch.no_grad():
        out = m(val_batch["input_ids"], val_batch["attention_mask"], val_batch["labels"])
        assert out.logits.shape == (6, 8)
        for i in range(len(val_batch["labels"])):
            n = int(val_batch["attention_mask"][i].sum())
            prompt = m.prompt["prefix_ids"] + val_batch["input_ids"][i, :n].tolist() + m.prompt["suffix_ids"]
            for c in range(len(LABELS)):
                answer = m.prompt["answer_ids"][c]
                logp = torch.log_softmax(lm(torch.tensor([prompt + answer])).logits[0].float(), -1)
                expect = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
                torch.testing.assert_close(out.logits[i, c], expect, rtol=1e-4, atol=1e-4)
        # loss = mean over examples of -log p(true answer | prompt)
        want = -out.logits.gather(1, val_batch["labels"][:, None]).mean()
        torch.testing.assert_close(out.loss, want)
    m.train()  # dropout 0: the training path (true answer only) gives the same loss, no logits
    train_out = m(val_batch["input_ids"], val_batch["attention_mask"], val_batch["labels"])
    assert train_out.logits is None
    torch.testing.assert_close(train_out.loss, out.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["seqcls", "causal-lm"])
def test_both_heads_learn_a_batch(tok, val_batch, head):
    m = build(tok, head=head)
    ids, mask, labels = val_batch["input_ids"], val_batch["attention_mask"], val_batch["labels"]

    def class_ce():  # cross-entropy of the class scores (what evaluation reports for both heads)
        m.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(m(ids, mask).logits.float(), labels).item()

    ce_before = class_ce()
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = m(ids, mask, labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert class_ce() < ce_before
    if head == "seqcls":
        m.eval()
        with torch.no_grad():
            assert (m(ids, mask).logits.argmax(1) == labels).float().mean() >= 0.8


@pytest.mark.parametrize("head", ["seqcls", "causal-lm"])
def test_weighted_loss_is_the_batch_mean_of_weight_times_loss(tok, val_batch, head):
    ids, mask, labels = val_batch["input_ids"], val_batch["attention_mask"], val_batch["labels"]
    m = build(tok, head=head, class_weights=WEIGHTS).eval()
    with torch.no_grad():
        scores = m(ids, mask).logits.float()
        per_example = -(torch.log_softmax(scores, -1) if head == "seqcls" else scores)[range(len(labels)), labels]
        want = sum(WEIGHTS[y] * loss for y, loss in zip(labels.tolist(), per_example.tolist())) / len(labels)
        assert len(set(labels.tolist())) >= 3 and abs(want - per_example.mean().item()) > 0.01
        assert m(ids, mask, labels).loss.item() == pytest.approx(want, rel=1e-5)
    m.train()  # the training path (causal-lm: true answer only) weighs the same way
    assert m(ids, mask, labels).loss.item() == pytest.approx(want, rel=1e-5)
    plain = build(tok, head=head)
    assert plain.state_dict().keys() == m.state_dict().keys()  # a non-persistent buffer: not in checkpoints
    assert m.class_weights.tolist() == WEIGHTS and plain.class_weights is None


@pytest.mark.parametrize("head", ["seqcls", "causal-lm"])
def test_weighted_step_is_the_same_for_every_split_of_the_global_batch(prepared_v2, tok, head):
    """What DeepSpeed does with each micro-batch's loss (backward of loss / (accum * world), gradients
    summed over micro-batches and averaged over ranks) gives the same loss and gradients for micro 4 x accum 1,
    1 x 4, 2 ranks x 2, ...: the weighted mean divides by the micro-batch size, a constant."""
    val = Prepared.load(prepared_v2).split("val")
    rows = [0, 1, 2, 3]
    m = build(tok, head=head, class_weights=WEIGHTS).train()
    results = {}
    for micro, accum, world in SPLITS_OF_4:
        m.zero_grad()
        loss = 0.0
        for rank in range(world):
            for part in rank_micro_batches(np.asarray(rows), rank, world, accum):
                b = read_batch(val, part, tok, DataConfig())
                micro_loss = m(b["input_ids"], b["attention_mask"], b["labels"]).loss / (accum * world)
                micro_loss.backward()
                loss += micro_loss.item()
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        results[micro, accum, world] = loss, grads
    ref_loss, ref_grads = results[4, 1, 1]
    for split, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), split
        assert (grads - ref_grads).abs().max() <= 1e-5 * ref_grads.abs().max(), split
    # A per-micro-batch normaliser, sum(w * loss) / sum(w), would not be: with micro-batches of one row the
    # weights cancel and the step is the unweighted mean.
    with torch.no_grad():
        m.eval()
        b = read_batch(val, rows, tok, DataConfig())
        scores = m(b["input_ids"], b["attention_mask"]).logits.float()
        nll = -(torch.log_softmax(scores, -1) if head == "seqcls" else scores)[range(4), b["labels"]]
        w = torch.tensor(WEIGHTS)[b["labels"]]
        assert abs((w * nll).sum() / w.sum() - nll.mean()) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(tok, val_batch):
    grads = []
    for ckpt in (False, True):
        m = build(tok, head="causal-lm", gradient_checkpointing=ckpt).train()
        m(val_batch["input_ids"], val_batch["attention_mask"], val_batch["labels"]).loss.backward()
        grads.append(m.hf_model.transformer.h[0].mlp.c_fc.weight.grad)
    assert m.hf_model.transformer.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_model_dir_loads_its_weights_and_refuses_another_tokenizer(tok, tmp_path):
    src = build(tok, head="causal-lm", seed=11)
    src.hf_model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = build(tok, head="seqcls", name=str(tmp_path / "m"), seed=12)
    torch.testing.assert_close(loaded.hf_model.transformer.wte.weight, src.hf_model.transformer.wte.weight)
    other = copy.deepcopy(tok)
    other.add_tokens(["<flow>"])
    with pytest.raises(CicError, match="tokenizer mismatch") as e:
        build(other, name=str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(e.value)


def test_missing_or_impossible_models_are_clear_errors(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(CicError, match="hf download openai-community/gpt2-large"):
        build(tok, name="gpt2-large", pretrained=True)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build(tok, name="tiny", pretrained=True)
    with pytest.raises(CicError, match="no such model directory"):
        build(tok, name=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="model.head"):
        TrafficClassifier(torch.nn.Linear(1, 1), "regression", LABELS)


@pytest.mark.parametrize("head", ["seqcls", "causal-lm"])
def test_rows_longer_than_the_context_are_a_clear_error(tok, head):
    m = build(tok, head=head)
    limit = m.max_row_tokens
    assert limit == 1024 if head == "seqcls" else 1000 < limit < 1024
    too_long = torch.zeros((1, limit + 1), dtype=torch.long)
    with pytest.raises(CicError, match=f"data.max_length <= {limit}"):
        m(too_long, torch.ones_like(too_long))


def test_flops_per_token_by_hand():
    cfg = build_hf_config(ModelConfig(name="gpt2"), LABELS)
    # 6 * 12 layers * 12 * 768^2 + 12 * 12 layers * 768 * 128 positions
    assert flops_per_token(cfg, 128) == 6 * 12 * 12 * 768**2 + 12 * 12 * 768 * 128
