"""Transform, the published checkpoint format, round trips and clear errors on bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from swiftkv.cli import main as cli_main
from swiftkv.config import SwiftKVConfig
from swiftkv.models.full_sequence import full_logits
from swiftkv.models.loader import load_model, save_checkpoint
from swiftkv.transform import convert_checkpoint, to_swiftkv

SEQS = [list(range(3, 30)), [9, 8, 7, 6]]


def _convert(hf_dir, tmp_path, arch="llama", l=3, G=1, **overrides):
    path, hf = hf_dir(arch, **overrides)
    out = tmp_path / f"{arch}-swiftkv"
    assert cli_main([*map(str, ["convert", path, "--out", out, "-l", l, "-G", G])]) == 0
    return path, out, hf


def test_initialisation_follows_spec(hf_dir):
    path, _ = hf_dir("qwen2")
    base = load_model(path)[0]
    model = to_swiftkv(base, SwiftKVConfig(6, 2, 2))
    layers = model.model.layers
    assert torch.equal(model.model.norm_swiftkv.weight, layers[2].input_layernorm.weight)
    for i in range(2, 6):
        a = layers[i].self_attn
        assert torch.equal(a.q_proj_swiftkv.weight, a.q_proj.weight) and torch.equal(a.q_proj_swiftkv.bias, a.q_proj.bias)
    for leader in (2, 4):
        a, b = layers[leader].self_attn, layers[leader + 1].self_attn
        torch.testing.assert_close(a.k_proj_swiftkv.weight, (a.k_proj.weight + b.k_proj.weight) / 2)
        torch.testing.assert_close(a.v_proj_swiftkv.bias, (a.v_proj.bias + b.v_proj.bias) / 2)
        assert not hasattr(b, "k_proj_swiftkv")


def test_published_format(hf_dir, tmp_path):
    _, out, _ = _convert(hf_dir, tmp_path, l=2, G=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama_swiftkv" and cfg["architectures"] == ["LlamaSwiftKVForCausalLM"]
    assert cfg["swiftkv"] is True and cfg["num_key_value_layers"] == 2 and cfg["key_value_group_size"] == 2
    names = set(load_file(out / "model.safetensors"))
    assert "model.norm_swiftkv.weight" in names
    assert {f"model.layers.{i}.self_attn.q_proj_swiftkv.weight" for i in range(2, 6)} <= names
    assert {f"model.layers.{i}.self_attn.k_proj_swiftkv.weight" for i in (2, 4)} <= names
    assert "model.layers.3.self_attn.k_proj_swiftkv.weight" not in names  # AcrossKV follower
    assert {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(6)} <= names  # teacher kept
    assert not list(tmp_path.glob(".*tmp-*")), "temporary directory left behind"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_trip_ours_and_automodel(hf_dir, tmp_path, arch):
    path, out, hf = _convert(hf_dir, tmp_path, arch=arch, l=2, G=2)
    model = to_swiftkv(load_model(path)[0], SwiftKVConfig(6, 2, 2))
    expected = full_logits(model, SEQS)
    reloaded = load_model(out)[0]
    assert reloaded.default_swiftkv
    for a, b in zip(full_logits(reloaded, SEQS), expected):
        assert torch.equal(a, b)
    assert type(AutoConfig.from_pretrained(out)).__name__.endswith("SwiftKVConfig")
    auto = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = auto(torch.tensor([SEQS[0]])).logits[0]
    torch.testing.assert_close(got, expected[0], atol=1e-5, rtol=1e-5)
    # a padded batch through the transformers wrapper (left padding, as generate() uses)
    ids = torch.tensor([[0] * 23 + SEQS[1], SEQS[0]])
    mask = torch.tensor([[0] * 23 + [1] * 4, [1] * 27])
    with torch.no_grad():
        got = auto(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 23:], expected[1], atol=1e-5, rtol=1e-5)
    # teacher rebuilt from the kept original tensors
    torch.testing.assert_close(full_logits(reloaded, SEQS, swiftkv=False)[0], hf(torch.tensor([SEQS[0]])).logits[0], atol=1e-5, rtol=1e-5)


def test_checkpoint_without_teacher_qkv_loads(hf_dir, tmp_path):
    _, out, _ = _convert(hf_dir, tmp_path, l=3)
    expected = full_logits(load_model(out)[0], SEQS)
    f = out / "model.safetensors"
    tensors = load_file(f)
    for i in range(3, 6):
        for p in "qkv":
            del tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"]
    save_file(tensors, f)
    model = load_model(out)[0]
    assert not model.teacher_available
    for a, b in zip(full_logits(model, SEQS), expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no original q/k/v for layers >= 3"):
        full_logits(model, SEQS, swiftkv=False)
    # the engine on it (a decode step runs fused where the kernels exist): greedy = the full-sequence model's
    from swiftkv.engine.llm_engine import EngineConfig, LLMEngine
    from swiftkv.models.full_sequence import greedy_generate
    from swiftkv.sampling_params import SamplingParams

    engine = LLMEngine(load_model(out, for_inference=True)[0], config=EngineConfig(kv_cache_memory=4 << 20))
    rid = engine.add_request(SEQS[0], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert done[rid] == greedy_generate(model, SEQS[0], 6)


def test_save_is_atomic_on_failure(hf_dir, tmp_path, monkeypatch):
    _, out, _ = _convert(hf_dir, tmp_path, l=3)
    before = (out / "model.safetensors").read_bytes()
    model = load_model(out)[0]

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("swiftkv.models.shards.save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(model, out)
    assert (out / "model.safetensors").read_bytes() == before  # old checkpoint intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("l,G,match", [
    (0, 1, r"0 < l <= L = 6"), (7, 1, r"0 < l <= L = 6"),
    (2, 3, r"G=3 must divide .* 4\. Valid G for l=2: \[1, 2, 4\]; valid l for G=3: \[3, 6\]"),
    (3, 0, r"key_value_group_size must be an integer >= 1"),
])
def test_invalid_layout_errors(l, G, match):
    with pytest.raises(ValueError, match=match):
        SwiftKVConfig(6, l, G)


def test_cli_reports_invalid_layout(hf_dir, tmp_path, capsys):
    path, _ = hf_dir("llama")
    assert cli_main(["convert", str(path), "--out", str(tmp_path / "x"), "-l", "2", "-G", "3"]) == 2
    assert "must divide" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_tensor_error(hf_dir):
    path, _ = hf_dir("llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_unsupported_architecture_error(hf_dir):
    path, _ = hf_dir("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"Unsupported architecture model_type='gpt2'.*Supported: llama, mistral, qwen2"):
        load_model(path)


def test_sliding_window_error(hf_dir):
    path, _ = hf_dir("llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sliding-window attention"):
        load_model(path)


def test_corrupt_safetensors_error(hf_dir):
    path, _ = hf_dir("llama")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: 1000])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(path)


def test_not_a_model_dir_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="neither a model directory nor a hub id"):
        load_model(tmp_path / "does-not-exist")


def test_sharded_checkpoint_loads(hf_dir, tmp_path):
    path, hf = hf_dir("llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = full_logits(load_model(sharded)[0], SEQS)
    b = full_logits(load_model(path)[0], SEQS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -- hostile and careless input: one clear line, nothing of the user's destroyed -----------------

def test_convert_never_replaces_what_it_did_not_write(hf_dir, tmp_path, capsys):
    path, _ = hf_dir("llama")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    assert cli_main(["convert", str(path), "--out", str(project), "-l", "3"]) == 2
    assert "not a swiftkv checkpoint" in capsys.readouterr().err
    assert (project / "notes.txt").read_text() == "mine" and len(list(project.iterdir())) == 1
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"data")
    assert cli_main(["convert", str(path), "--out", str(a_file), "-l", "3"]) == 2
    assert "is not a directory" in capsys.readouterr().err and a_file.read_bytes() == b"data"
    assert cli_main(["convert", str(path), "--out", str(path), "-l", "3"]) == 2  # the source itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-base", "model.bin", "project"]  # no strays
    ckpt = tmp_path / "ckpt"
    assert cli_main(["convert", str(path), "--out", str(ckpt), "-l", "3"]) == 0
    assert cli_main(["convert", str(path), "--out", str(ckpt), "-l", "4"]) == 0  # a checkpoint is replaced
    assert json.loads((ckpt / "config.json").read_text())["num_key_value_layers"] == 4
    assert cli_main(["convert", str(path), "--out", str(a_file), "-l", "3", "--overwrite"]) == 0
    assert (a_file / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,match", [
    (["--swiftkv-fraction", "0.01", "-G", "4"], "rounds to no SwiftKV layer"),
    (["--swiftkv-fraction", "0.5", "-G", "2"], r"gives 3 SwiftKV layers, which AcrossKV G=2 does not divide; use 0.333 \(l = 4\) or 0.667"),
])
def test_convert_fraction_errors(hf_dir, tmp_path, capsys, args, match):
    path, _ = hf_dir("llama")
    assert cli_main(["convert", str(path), "--out", str(tmp_path / "x"), *args]) == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def _edit_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


def test_bad_config_json_one_line(hf_dir):
    path, _ = hf_dir("llama")
    _edit_config(path, dtype="float99")
    with pytest.raises(ValueError, match=r"config.json: dtype 'float99' is not a torch dtype"):
        load_model(path)
    (path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(.* line 1"):
        load_model(path)


def test_missing_org_name_path_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'runs/l15': no such directory, and the hub could not provide it") as e:
        load_model("runs/l15")
    assert "\n" not in str(e.value)


def test_sharded_index_hostile(hf_dir, tmp_path):
    path, hf = hf_dir("llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    outside = tmp_path / "x.safetensors"
    first = next(iter(data["weight_map"]))
    (sharded / data["weight_map"][first]).rename(outside)
    data["weight_map"][first] = "../x.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"names the shard '../x.safetensors', which is outside"):
        load_model(sharded)
    index.write_text("{not json")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON"):
        load_model(sharded)


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.to(torch.int32), r"down_proj.weight is stored as torch.int32"),
    (lambda t: torch.full_like(t, float("nan")), r"down_proj.weight contains NaN or Inf"),
])
def test_non_float_and_non_finite_tensors_refused(hf_dir, damage, match):
    path, _ = hf_dir("llama")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.2.mlp.down_proj.weight"
    tensors[name] = damage(tensors[name])
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_shipped_model_assembles_into_a_fresh_cache(hf_dir, tmp_path, monkeypatch):
    """A shipped model is the default base + its trained tensors, built once into an empty cache
    (a fresh machine), and rebuilt when the tensors change."""
    from swiftkv import builtin
    from swiftkv.models.registry import ShippedModel

    base_dir, _ = hf_dir("llama")
    base = load_model(base_dir)[0]
    trained = {n: p.detach().clone() + 0.5 for n, p in to_swiftkv(base, SwiftKVConfig(6, 3, 1)).named_parameters()
               if "_swiftkv" in n}
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    save_file(trained, str(shipped / "t.safetensors"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "default_model_dir", lambda: base_dir)
    monkeypatch.setattr(builtin, "SHIPPED_DIR", shipped)
    monkeypatch.setitem(builtin.SHIPPED_MODELS, "tiny-swiftkv", ShippedModel(3, 1, "t.safetensors", 0))
    out = builtin.resolve_model("tiny-swiftkv")
    assert out == tmp_path / "cache" / "swiftkv" / "models" / "tiny-swiftkv"
    model = load_model(out)[0]
    params = dict(model.named_parameters())
    assert model.swiftkv_config.num_key_value_layers == 3
    assert all(torch.equal(params[n], t) for n, t in trained.items())
    assert builtin.resolve_model("tiny-swiftkv") == out  # cached: not rebuilt
    save_file({n: t + 1 for n, t in trained.items()}, str(shipped / "t.safetensors"))
    model = load_model(builtin.resolve_model("tiny-swiftkv"))[0]
    assert torch.equal(dict(model.named_parameters())["model.layers.3.self_attn.q_proj_swiftkv.weight"],
                       trained["model.layers.3.self_attn.q_proj_swiftkv.weight"] + 1)


def test_the_temporary_cleaner_never_deletes_the_users_backups(hf_dir, tmp_path, capsys):
    """Backup files and directories named like .X.old-N / .X.tmp-N beside --out are the user's: convert leaves
    them, and removes only its own stale temporaries (``.X.swiftkv-tmp-PID-RANDOM`` of a dead PID)."""
    path, _ = hf_dir("llama")
    home = tmp_path / "home"
    home.mkdir()
    vim = home / ".vim.old-20231205"
    vim.mkdir()
    (vim / "vimrc").write_text("set nu")
    (home / ".bashrc.old-2024-01-15").write_text("alias ll='ls -l'")
    (home / ".notes.tmp-1").write_text("draft")
    dead = home / ".newmodel.swiftkv-tmp-999999999-ab12cd34"  # a killed convert's half-written directory
    dead.mkdir()
    alive = home / f".other.swiftkv-tmp-{os.getpid()}-ab12cd34"  # a running process's
    alive.write_text("")
    assert cli_main(["convert", str(path), "--out", str(home / "newmodel"), "-l", "3"]) == 0
    assert (vim / "vimrc").read_text() == "set nu" and (home / ".bashrc.old-2024-01-15").exists()
    assert (home / ".notes.tmp-1").exists() and alive.exists() and not dead.exists()


def test_replacing_a_checkpoint_refuses_files_the_format_does_not_explain(hf_dir, tmp_path, capsys):
    path, _ = hf_dir("llama")
    ckpt = tmp_path / "ckpt"
    assert cli_main(["convert", str(path), "--out", str(ckpt), "-l", "3"]) == 0
    (ckpt / "README.md").write_text("my notes")
    (ckpt / ".git").mkdir()
    assert cli_main(["convert", str(path), "--out", str(ckpt), "-l", "4"]) == 2
    err = capsys.readouterr().err
    assert ".git, README.md" in err and "--overwrite" in err and (ckpt / "README.md").read_text() == "my notes"
    assert cli_main(["convert", str(path), "--out", str(ckpt), "-l", "4", "--overwrite"]) == 0
    assert not (ckpt / "README.md").exists()


def test_side_files_copied_are_known_ones_with_the_sources_permissions(hf_dir, tmp_path):
    """Only tokenizer / config / licence files come along (not a 2 GB .gguf or a README), read through symlinks
    (the hub cache's layout), and a private (0600) file stays private."""
    path, _ = hf_dir("llama")
    blob = tmp_path / "blob"
    blob.write_text('{"model_max_length": 64}')
    os.chmod(blob, 0o600)
    (path / "tokenizer_config.json").unlink(missing_ok=True)
    (path / "tokenizer_config.json").symlink_to(blob)
    (path / "model.gguf").write_bytes(b"GGUF")
    (path / "README.md").write_text("hub card")
    (path / "LICENSE").write_text("licence")
    out = convert_checkpoint(path, tmp_path / "skv", SwiftKVConfig(6, 3))
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer_config.json", "LICENSE"} <= names and not {"model.gguf", "README.md"} & names
    assert not (out / "tokenizer_config.json").is_symlink()
    assert (out / "tokenizer_config.json").read_text() == blob.read_text()
    assert (out / "tokenizer_config.json").stat().st_mode & 0o777 == 0o600


def test_sharded_checkpoint_in_the_hub_cache_layout_loads(hf_dir, tmp_path):
    """snapshot_download stores every file as a symlink into ../../blobs/: a sharded checkpoint laid out so loads
    (same logits), while an index naming an absolute path is still refused."""
    path, hf = hf_dir("llama")
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abc"
    blobs = tmp_path / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    staged = tmp_path / "staged"
    hf.save_pretrained(staged, max_shard_size="100KB")
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(staged.iterdir())):
        blob = blobs / f"{i:040x}"
        f.rename(blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    assert len(list(snapshot.glob("model-*.safetensors"))) > 1
    ids = [[3, 1, 4, 1, 5]]
    torch.testing.assert_close(full_logits(load_model(snapshot)[0], ids)[0],
                               full_logits(load_model(path)[0], ids)[0])
    index = snapshot / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = str(blobs / ("0" * 40))
    index.unlink()
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="which is outside"):
        load_model(snapshot)


def test_a_config_that_does_not_describe_the_weights_is_refused_before_building(hf_dir):
    path, _ = hf_dir("llama")
    _edit_config(path, num_hidden_layers=10**9)  # would build layers until killed
    with pytest.raises(ValueError, match=r"num_hidden_layers=1000000000 but the weights hold layers 0\.\.5"):
        load_model(path)
    _edit_config(path, num_hidden_layers=6, intermediate_size=4096)
    with pytest.raises(ValueError, match=r"gate_proj.weight as \[4096, 64\] .* weights hold \[112, 64\]"):
        load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "header-length", "header-json", "offsets"])
def test_corrupt_safetensors_headers_are_one_line_errors(hf_dir, damage):
    path, _ = hf_dir("llama")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "truncated":
        data = data[: 8 + n + 100]
    elif damage == "header-length":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "header-json":
        data[8:12] = b"\xff{[x"
    else:
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = [0, 10**12]
        raw = json.dumps(header).encode().ljust(n)
        data[8 : 8 + n] = raw[:n] if len(raw) == n else raw
        data[:8] = len(raw).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is not a valid safetensors file") as e:
        load_model(path)
    assert "\n" not in str(e.value) and "re-" in str(e.value)


def test_a_single_file_larger_than_memory_is_refused_cleanly(hf_dir, tmp_path):
    """A 64 GB single-file checkpoint (sparse: no disk used) under an 8 GB address-space limit: the memory check
    reads the header (8-byte length + JSON), never maps the file, and refuses with the usual one-line message."""
    import subprocess
    import sys

    path, _ = hf_dir("llama")
    f = path / "model.safetensors"
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    size = 64 << 30
    name = "model.embed_tokens.weight"
    header[name]["data_offsets"] = [header[name]["data_offsets"][0], header[name]["data_offsets"][0]]  # placeholder
    old_end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["model.extra_pad.weight"] = {"dtype": "F32", "shape": [size // 4], "data_offsets": [old_end, old_end + size]}
    header[name]["data_offsets"] = [0, 0]
    header.pop(name)  # keep every other tensor as it is
    raw = json.dumps(header).encode()
    body_start = 8 + n
    with open(f, "rb") as fh:
        fh.seek(body_start)
        body = fh.read()
    with open(f, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw + body)
        fh.truncate(8 + len(raw) + old_end + size)
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
from swiftkv.llm import LLM
try:
    LLM({str(path)!r}, dtype="float32")
except ValueError as e:
    print("REFUSED", e)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert "REFUSED" in run.stdout and "needs about 6" in run.stdout, (run.stdout, run.stderr[-1500:])


@pytest.mark.parametrize("field,value,match", [
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer"),
    ("hidden_size", -64, "hidden_size must be a positive integer, got -64"),
    ("rms_norm_eps", "x", "Cannot read .*config.json: Validation error for field 'rms_norm_eps'"),
    ("num_key_value_heads", 3, "must be a multiple of num_key_value_heads"),
])
def test_invalid_configs_are_one_line_errors_in_load_and_convert(hf_dir, tmp_path, capsys, field, value, match):
    path, _ = hf_dir("llama")
    _edit_config(path, **{field: value})
    capsys.readouterr()
    for argv in (["generate", str(path), "--prompt", "hi", "--raw", "--max-tokens", "1"],
                 ["convert", str(path), "--out", str(tmp_path / "out"), "-l", "3"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and __import__("re").search(match, err[0]), err
    assert not (tmp_path / "out").exists()  # convert wrote nothing it could not load
