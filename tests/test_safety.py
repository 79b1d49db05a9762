"""Loading is safe: safetensors for model weights, `torch.load(..., weights_only=True)` for every torch file
the package reads, never `trust_remote_code`, and no network access for model or tokenizer names that are
not cached locally (a CicError saying how to fetch them on a login node instead).

DeepSpeed's own checkpoint reader (`engine.load_checkpoint` -> TorchCheckpointEngine.load) calls
`torch.load(path, weights_only=False)`: the ZeRO files hold pickled optimizer metadata. That is DeepSpeed's
business and means a checkpoint directory must be trusted like code: load only checkpoints your own runs
wrote (docs/RELIABILITY.md says so). Exports, the artefact people share, are safetensors + JSON only.
"""
from __future__ import annotations

import ast
import json
import re
import socket
from pathlib import Path

import pytest
import numpy as np
import torch

from cic_gpt2.errors import CicError

PACKAGE = Path(__file__).resolve().parent.parent / "cic_gpt2"
SOURCES = sorted(PACKAGE.glob("*.py"))


def _calls(name: str):
    """(file, line, ast.Call) for every call of `name` (a dotted suffix, e.g. "torch.load") in the package."""
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                if func == name or func.endswith("." + name):
                    yield path, node.lineno, node


def test_the_source_scan_sees_the_package():
    assert PACKAGE / "train.py" in SOURCES and PACKAGE / "checkpoint.py" in SOURCES
    assert any(True for _ in _calls("from_pretrained")), "the scan finds calls (else the tests below prove nothing)"


def test_every_torch_load_passes_weights_only_true():
    calls = list(_calls("torch.load"))
    assert calls, "the package reads torch files somewhere (checkpoint RNG states)"
    unsafe = []
    for path, line, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            unsafe.append(f"{path.name}:{line}: {ast.unparse(call)}")
    assert not unsafe, "torch.load without weights_only=True: " + "; ".join(unsafe)


def test_rng_state_files_load_with_weights_only(tmp_path):
    """What train writes into every checkpoint (checkpoint.rng_state) must load with weights_only=True."""
    from cic_gpt2 import checkpoint

    path = tmp_path / "rng_state_rank0.pt"
    torch.save(checkpoint.rng_state(), path)
    expected = (np.random.rand(3).tolist(), torch.rand(3).tolist())  # draws right after the save
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    assert (np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_trust_remote_code_is_never_enabled():
    text = "\n".join(p.read_text(encoding="utf-8") for p in SOURCES)
    assert not re.search(r"trust_remote_code\s*=\s*True", text)
    for path, line, call in _calls("from_pretrained"):
        kw = {k.arg: k.value for k in call.keywords}
        assert "trust_remote_code" not in kw or ast.unparse(kw["trust_remote_code"]) == "False", f"{path.name}:{line}"
        # every Hub-capable load is local-only: names resolve from disk or the cache, never a download
        assert ast.unparse(kw.get("local_files_only", ast.Constant(False))) == "True", f"{path.name}:{line}"


def test_export_is_safetensors_only(prepared_v2, tmp_path):
    from cic_gpt2.config import ModelConfig
    from cic_gpt2.exported import Export, export_hf
    from cic_gpt2.model import build_model, load_model_tokenizer

    manifest = json.loads((prepared_v2 / "manifest.json").read_text())
    cfg = ModelConfig(name="tiny")
    tokenizer = load_model_tokenizer(cfg)
    torch.manual_seed(0)
    classifier = build_model(cfg, manifest["label_names"], tokenizer)
    out = export_hf(classifier, tmp_path / "export", tokenizer, manifest)
    names = {p.name for p in Path(out).iterdir()}
    assert "model.safetensors" in names
    assert not names & {"pytorch_model.bin", "training_args.bin"} and not any(n.endswith((".pt", ".pth", ".pkl"))
                                                                            for n in names), names
    reloaded, _ = Export.open(out).load()
    for (name, a), b in zip(classifier.hf_model.state_dict().items(), reloaded.hf_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty HF cache and every socket connect refused (counted): a load that tries the network fails loudly."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"test: network access to {address} blocked")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return attempts


@pytest.mark.parametrize("name", ["gpt2-medium", "distilgpt2", "someone/not-cached-model"])
def test_uncached_model_fails_with_a_cicerror_without_network(no_network, name):
    from cic_gpt2.config import ModelConfig
    from cic_gpt2.model import build_model, load_model_tokenizer

    cfg = ModelConfig(name=name, pretrained=name.startswith("gpt2"))
    with pytest.raises(CicError) as e:
        build_model(cfg, ["Benign", "DDoS"], load_model_tokenizer(cfg))
    msg = str(e.value)
    # a bare name: looked up in the (empty) cache; an org/name id is read as a path (no such directory)
    assert ("not in the Hugging Face cache" in msg and "download" in msg) or "no such model directory" in msg, msg
    assert no_network == [], f"tried the network: {no_network}"


def test_uncached_tokenizer_fails_with_a_cicerror_without_network(no_network):
    from cic_gpt2.tokenizer import load_tokenizer

    with pytest.raises(CicError, match="not in the Hugging Face cache"):
        load_tokenizer("gpt2-large")
    assert no_network == []
