"""export.py: live export round trip (both heads), pipeline on template text, ZeRO-2 checkpoint -> export."""
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel, pipeline

from cic_gpt2.files import free_port
from cic_gpt2.config import DataConfig, ModelConfig, RunConfig, to_dict
from cic_gpt2.data import read_batch
from cic_gpt2.prepared import Prepared
from cic_gpt2.errors import CicError
from cic_gpt2.exported import Export, export_hf
from cic_gpt2.model import build_model
from cic_gpt2.tokenizer import load_tokenizer
from conftest import run_cli, run_proc


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def prepared(prepared_v2):
    return Prepared.load(prepared_v2)


@pytest.fixture(scope="module")
def batch(prepared, tok):
    return read_batch(prepared.split("test"), np.arange(8), tok, DataConfig())


def build(prepared, tok, head, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(head=head), prepared.label_names, tok).eval()


def test_seqcls_export_loads_with_auto_class_and_pipeline(prepared, tok, batch, tmp_path):
    live = build(prepared, tok, "seqcls")
    out = export_hf(live, tmp_path / "export", tok, prepared.manifest, to_dict(RunConfig()), {"zero_optimization": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dir left behind
    for name in ("config.json", "model.safetensors", "cic_gpt2.json", "data_manifest.json", "run_config.yaml",
                 "ds_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    with torch.no_grad():
        want = live(batch["input_ids"], batch["attention_mask"]).logits
        hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, want)
        again, tok2 = Export.open(out).load()
        manifest = Export.open(out).manifest
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]).logits, want)
    assert manifest["label_names"] == prepared.label_names and hf.config.id2label[0] == prepared.label_names[0]

    # Text made by the same template (decode of the prepared ids re-tokenizes to the same ids).
    clf = pipeline("text-classification", model=str(out), tokenizer=str(out), device="cpu")
    texts = [tok.decode(row[: int(m.sum())].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    results = clf(texts, top_k=None)
    for i, ranked in enumerate(results):
        probs = torch.softmax(want[i], -1)
        assert ranked[0]["label"] == prepared.label_names[int(probs.argmax())]
        assert ranked[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_causal_lm_export_keeps_tied_weights_and_scores(prepared, tok, batch, tmp_path):
    live = build(prepared, tok, "causal-lm")
    out = export_hf(live, tmp_path / "lm", tok, prepared.manifest)
    lm = GPT2LMHeadModel.from_pretrained(out)
    assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(lm.transformer.wte.weight, live.hf_model.transformer.wte.weight)
    again, _ = Export.open(out).load()
    meta = json.loads((out / "cic_gpt2.json").read_text())
    assert meta["head"] == "causal-lm" and meta["prompt"]["prompt_suffix"] == live.prompt["prompt_suffix"]
    with torch.no_grad():
        torch.testing.assert_close(again(batch["input_ids"], batch["attention_mask"]).logits,
                                   live(batch["input_ids"], batch["attention_mask"]).logits)
    # Re-export over an existing directory replaces it whole.
    export_hf(build(prepared, tok, "seqcls"), out, tok, prepared.manifest)
    assert json.loads((out / "cic_gpt2.json").read_text())["head"] == "seqcls"


def test_half_precision_model_exports_fp32_and_stays_untouched(prepared, tok, tmp_path):
    live = build(prepared, tok, "seqcls").to(torch.bfloat16)
    export_hf(live, tmp_path / "bf16", tok, prepared.manifest)
    assert next(live.parameters()).dtype == torch.bfloat16  # the engine's module is not cast
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "float32"
    assert next(hf.parameters()).dtype == torch.float32
    assert torch.equal(hf.score.weight, live.hf_model.score.weight.float())


ZERO_SCRIPT = textwrap.dedent("""
    import json, sys, torch, deepspeed, yaml
    from pathlib import Path
    from cic_gpt2 import checkpoint, dist
    from cic_gpt2.config import ModelConfig, DataConfig, RunConfig, to_dict
    import numpy as np
    from cic_gpt2.data import train_batches, read_batch
    from cic_gpt2.prepared import Prepared
    from cic_gpt2.model import build_model
    from cic_gpt2.tokenizer import load_tokenizer

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    prepared, tok = Prepared.load(data), load_tokenizer(None)
    dist.init(dist.discover())
    for head in ("seqcls", "causal-lm"):
        run_dir = out / head
        cfg = RunConfig(model=ModelConfig(head=head, dropout=0.0))
        torch.manual_seed(0)
        model = build_model(cfg.model, prepared.label_names, tok)
        ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        batches = train_batches(prepared.split("train"), epoch=0, start_step=0, seed=0, micro_batch_size=4,
                                grad_accum=1, rank=0, world_size=1, tokenizer=tok, data_cfg=DataConfig())
        for _ in range(2):
            (b,) = next(batches)
            engine.backward(engine(b["input_ids"], b["attention_mask"], b["labels"]).loss)
            engine.step()
        side = {"run_config.yaml": yaml.safe_dump(to_dict(cfg)), "data_manifest.json": json.dumps(prepared.manifest),
                "ds_config.json": json.dumps(ds)}
        checkpoint.save(engine, run_dir / "checkpoints", 2, {"step": 2}, rank=0, world_size=1, is_main=True,
                        side_files=side, keep_last=2)
        engine.eval()
        b = read_batch(prepared.split("test"), np.arange(8), tok, DataConfig())
        with torch.no_grad():
            logits = engine(b["input_ids"], b["attention_mask"]).logits
        torch.save({"batch": b, "logits": logits}, run_dir / "live.pt")
    dist.destroy()
""")


@pytest.fixture(scope="module")
def zero2_runs(prepared_v2, tmp_path_factory):
    """One real 1-process DeepSpeed ZeRO-2 (CPU, fp32) run per head, 2 steps, saved with checkpoint.save."""
    out = tmp_path_factory.mktemp("zero2")
    script = out / "train_tiny.py"
    script.write_text(ZERO_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run_proc([sys.executable, str(script), str(prepared_v2), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("head", ["seqcls", "causal-lm"])
def test_export_of_a_zero2_checkpoint_predicts_like_the_live_engine(zero2_runs, head):
    run_dir = zero2_runs / head
    live = torch.load(run_dir / "live.pt", weights_only=False)

    assert run_cli("export", run_dir) == 0  # the run dir: its latest complete checkpoint
    out = run_dir / "export-step-000002"
    b = live["batch"]
    with torch.no_grad():
        if head == "seqcls":
            hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
            got = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        else:
            got = Export.open(out).load()[0](b["input_ids"], b["attention_mask"]).logits
    torch.testing.assert_close(got, live["logits"], rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == live["logits"].argmax(1)).all()
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


def test_export_refuses_incomplete_or_missing_checkpoints(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / "run_config.yaml").write_text("{}")
    assert run_cli("export", tmp_path / "checkpoints" / "step-000004") == 2
    assert "incomplete" in capsys.readouterr().err
    assert run_cli("export", tmp_path) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(CicError, match="not an exported model"):
        Export.open(tmp_path)
