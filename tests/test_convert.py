"""`jaxmoe convert`: round trip, sharded sources, dtype casts, bad inputs, atomicity, streaming."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import TINY_FAMILIES
from jaxmoe import checkpoint as ckpt
from jaxmoe.convert import ConversionError, convert
from jaxmoe.models import UnsupportedModelError, tensor_map

FAMILIES = sorted(TINY_FAMILIES)
SUPPORTED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
EXPERT_NAME = ("gate", "up", "down")


# ------------------------------------------------------------------------------------------ helpers


def source_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) HF checkpoint, read with the reference safetensors library."""
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def documented_transform(ours: str, theirs: np.ndarray) -> np.ndarray:
    """The documented layout change, spelled independently of TensorSpec.transpose: linear weights
    keep PyTorch's [out, in]; a routed expert's gate/up stay [I, D] and its down goes [D, I] ->
    [I, D]; embeddings, norm scales and biases are copied as they are."""
    parts = ours.split(".")
    if len(parts) >= 5 and parts[2:4] == ["mlp", "experts"]:
        return theirs.T if parts[-1] == "down" else theirs
    return theirs


def converted_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for unit in ckpt.read_manifest(model_dir)["units"]:
        arrays = ckpt.read_unit(model_dir, unit)
        assert all(ckpt.unit_of(k) == unit for k in arrays), (unit, sorted(arrays))
        out.update(arrays)
    return out


def copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def no_leftovers(out: Path) -> None:
    """After a failed conversion: no output directory and no hidden partial sibling."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def rewrite(file: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})


def synthetic_mixtral(path: Path, hidden=64, inter=64, experts=16, layers=4, vocab=128, seed=0) -> Path:
    """A random Mixtral-named checkpoint written straight with safetensors (one shard per layer)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    heads, kv = 4, 2
    hd = hidden // heads

    def rnd(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    shards: list[dict[str, np.ndarray]] = [
        {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": rnd(hidden), "lm_head.weight": rnd(vocab, hidden)}
    ]
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t = {f"{p}.input_layernorm.weight": rnd(hidden), f"{p}.post_attention_layernorm.weight": rnd(hidden),
             f"{p}.self_attn.q_proj.weight": rnd(heads * hd, hidden), f"{p}.self_attn.k_proj.weight": rnd(kv * hd, hidden),
             f"{p}.self_attn.v_proj.weight": rnd(kv * hd, hidden), f"{p}.self_attn.o_proj.weight": rnd(hidden, heads * hd),
             f"{p}.block_sparse_moe.gate.weight": rnd(experts, hidden)}
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t |= {f"{q}.w1.weight": rnd(inter, hidden), f"{q}.w3.weight": rnd(inter, hidden), f"{q}.w2.weight": rnd(hidden, inter)}
        shards.append(t)
    weight_map = {}
    for i, t in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        rewrite(path / name, t)
        weight_map |= dict.fromkeys(t, name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=hd, num_local_experts=experts, num_experts_per_tok=2,
                  rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=False,
                  torch_dtype="float32", bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_every_tensor(family, hf_checkpoints, converted):
    _, hf_dir = hf_checkpoints[family]
    model_dir = converted[family]
    manifest = ckpt.read_manifest(model_dir)
    config = ckpt.load_config(model_dir)
    src = source_tensors(hf_dir)
    ours = converted_tensors(model_dir)
    specs = tensor_map(config)
    # Every source tensor is used exactly once and every converted tensor comes from one.
    assert sorted(s.theirs for s in specs) == sorted(src)
    assert sorted(s.ours for s in specs) == sorted(ours)
    for s in specs:
        want = documented_transform(s.ours, src[s.theirs])
        got = ours[s.ours]
        assert got.dtype == np.float32 and got.shape == want.shape, s
        np.testing.assert_array_equal(got, want, err_msg=f"{s.ours} <- {s.theirs}")
    # The manifest lists every unit (and only units that exist on disk).
    expected_units = {ckpt.unit_of(s.ours) for s in specs}
    assert set(manifest["units"]) == expected_units and len(manifest["units"]) == len(expected_units)
    assert {p.name for p in (model_dir / ckpt.WEIGHTS).iterdir()} == expected_units
    for layer in config.moe_layer_ids:
        for e in range(config.num_experts):
            assert ckpt.expert_unit(layer, e) in expected_units
    assert manifest["config"] == config.to_json()
    # Copied source files.
    for name in ("config.json", "generation_config.json"):
        assert (model_dir / name).read_bytes() == (hf_dir / name).read_bytes()


def test_load_params_translates_the_layout(hf_checkpoints, converted):
    """load_params gives each expert its own arrays (gate_up = [w1; w3], down = w2), fuses
    attention's q/k/v into one [out, in] weight, and keeps every other weight as PyTorch has it."""
    _, hf_dir = hf_checkpoints["mixtral"]
    src = source_tensors(hf_dir)
    config = ckpt.load_config(converted["mixtral"])
    params = ckpt.load_params(converted["mixtral"], place=np.asarray)
    E, I, D = config.num_experts, config.moe_intermediate_size, config.hidden_size
    for layer in range(config.num_layers):
        mlp = params["layers"][layer]["mlp"]
        assert sorted(mlp["experts"]) == list(range(E))
        for e in range(E):
            ref = {n: src[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")}
            expert = mlp["experts"][e]
            assert np.asarray(expert["gate_up"]).shape == (2 * I, D) and np.asarray(expert["down"]).shape == (D, I)
            np.testing.assert_array_equal(expert["gate_up"], np.concatenate([ref["w1"], ref["w3"]]))
            np.testing.assert_array_equal(expert["down"], ref["w2"])
        np.testing.assert_array_equal(mlp["router"]["weight"], src[f"model.layers.{layer}.block_sparse_moe.gate.weight"])
        attn = f"model.layers.{layer}.self_attn"
        np.testing.assert_array_equal(params["layers"][layer]["attn"]["qkv"]["weight"],
                                      np.concatenate([src[f"{attn}.{p}_proj.weight"] for p in "qkv"]))
        np.testing.assert_array_equal(params["layers"][layer]["attn"]["o"]["weight"], src[f"{attn}.o_proj.weight"])
    np.testing.assert_array_equal(params["embed"]["embedding"], src["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"]["weight"], src["lm_head.weight"])


def test_load_params_fuses_biases_and_shared_expert(hf_checkpoints, converted):
    """Qwen2-MoE: q/k/v biases fused like their weights; gate and up fused in the shared expert and
    in dense layers' MLPs."""
    _, hf_dir = hf_checkpoints["qwen2_moe"]
    src = source_tensors(hf_dir)
    config = ckpt.load_config(converted["qwen2_moe"])
    params = ckpt.load_params(converted["qwen2_moe"], place=np.asarray)
    for layer in range(config.num_layers):
        attn = f"model.layers.{layer}.self_attn"
        np.testing.assert_array_equal(params["layers"][layer]["attn"]["qkv"]["bias"],
                                      np.concatenate([src[f"{attn}.{p}_proj.bias"] for p in "qkv"]))
        mlp = params["layers"][layer]["mlp"]
        theirs = f"model.layers.{layer}.mlp"
        if config.moe_layers[layer]:
            mlp, theirs = mlp["shared"], f"{theirs}.shared_expert"
        np.testing.assert_array_equal(mlp["gate_up"]["weight"], np.concatenate(
            [src[f"{theirs}.gate_proj.weight"], src[f"{theirs}.up_proj.weight"]]))
        np.testing.assert_array_equal(mlp["down"]["weight"], src[f"{theirs}.down_proj.weight"])
    assert not all(config.moe_layers) and any(config.moe_layers)  # both kinds of MLP checked


def test_tokenizer_files_are_copied(hf_checkpoints, tmp_path):
    hf_dir = copy_hf(hf_checkpoints["mixtral"][1], tmp_path / "hf")
    files = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 256}',
             "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}"}
    for name, text in files.items():
        (hf_dir / name).write_text(text)
    (hf_dir / "README.md").write_text("not copied")
    out = tmp_path / "out"
    convert(hf_dir, out, progress=False)
    for name, text in files.items():
        assert (out / name).read_text() == text
    assert not (out / "README.md").exists()
    assert not list(out.glob("*.safetensors"))


def test_empty_existing_output_dir_is_accepted(hf_checkpoints, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    convert(hf_checkpoints["mixtral"][1], out, progress=False)
    assert ckpt.read_manifest(out)["units"] == ckpt.read_manifest(converted["mixtral"])["units"]


# -------------------------------------------------------------------------------- sharded and dtype


@pytest.fixture(scope="module")
def sharded_mixtral(hf_checkpoints, tmp_path_factory):
    model, _ = hf_checkpoints["mixtral"]
    path = tmp_path_factory.mktemp("hf-mixtral-sharded")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="50KB")
    return path


def test_sharded_source_converts_identically(sharded_mixtral, converted, tmp_path):
    index = json.loads((sharded_mixtral / "model.safetensors.index.json").read_text())
    shards = sorted(sharded_mixtral.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (sharded_mixtral / "model.safetensors").exists()
    out = tmp_path / "out"
    convert(sharded_mixtral, out, progress=False)
    ref_dir = converted["mixtral"]
    assert ckpt.read_manifest(out)["units"] == ckpt.read_manifest(ref_dir)["units"]
    got, ref = converted_tensors(out), converted_tensors(ref_dir)
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        assert got[k].dtype == ref[k].dtype


def test_bfloat16_conversion_is_the_float32_cast(hf_checkpoints, converted, tmp_path):
    out = tmp_path / "bf16"
    config = convert(hf_checkpoints["mixtral"][1], out, dtype="bfloat16", progress=False)
    assert config.dtype == "bfloat16" and ckpt.load_config(out).dtype == "bfloat16"
    got, ref = converted_tensors(out), converted_tensors(converted["mixtral"])
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        assert got[k].dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(got[k].view(np.uint16), r.astype(ml_dtypes.bfloat16).view(np.uint16), err_msg=k)


def test_unknown_dtype_is_refused(hf_checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="float64"):
        convert(hf_checkpoints["mixtral"][1], tmp_path / "out", dtype="float64", progress=False)
    no_leftovers(tmp_path / "out")


# ---------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def mixtral_copy(hf_checkpoints, tmp_path):
    return copy_hf(hf_checkpoints["mixtral"][1], tmp_path / "hf")


def _fails(hf_dir: Path, out: Path, error=ConversionError) -> str:
    with pytest.raises(error) as info:
        convert(hf_dir, out, progress=False)
    no_leftovers(out)
    return str(info.value)


def test_missing_tensor(mixtral_copy, tmp_path):
    file = mixtral_copy / "model.safetensors"
    tensors = load_file(file)
    victim = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    del tensors[victim]
    rewrite(file, tensors)
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert f"missing tensor {victim!r}" in msg and "layers.1.mlp.experts.2.down" in msg


def test_unexpected_tensor(mixtral_copy, tmp_path):
    file = mixtral_copy / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = np.zeros((32, 64), np.float32)
    rewrite(file, tensors)
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert "unexpected tensor 'model.layers.0.block_sparse_moe.experts.9.w1.weight'" in msg
    assert "model.safetensors" in msg


def test_inv_freq_buffers_are_ignored(mixtral_copy, tmp_path):
    file = mixtral_copy / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    rewrite(file, tensors)
    convert(mixtral_copy, tmp_path / "out", progress=False)
    assert not any("inv_freq" in k for k in converted_tensors(tmp_path / "out"))


def test_wrong_shape(mixtral_copy, tmp_path):
    file = mixtral_copy / "model.safetensors"
    tensors = load_file(file)
    victim = "model.layers.0.self_attn.k_proj.weight"
    tensors[victim] = np.zeros((16, 64), np.float32)  # expected [32, 64]
    rewrite(file, tensors)
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert repr(victim) in msg and "model.safetensors" in msg
    assert "[16, 64]" in msg and "[32, 64]" in msg


def test_all_problems_are_listed_at_once(mixtral_copy, tmp_path):
    file = mixtral_copy / "model.safetensors"
    tensors = load_file(file)
    del tensors["lm_head.weight"]
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    tensors["bogus"] = np.ones(1, np.float32)
    rewrite(file, tensors)
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert "'lm_head.weight'" in msg and "'model.norm.weight'" in msg and "'bogus'" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_json", "short", "data_truncated"])
def test_corrupt_safetensors(mixtral_copy, tmp_path, damage):
    file = mixtral_copy / "model.safetensors"
    raw = file.read_bytes()
    if damage == "truncated":  # cut inside the JSON header
        file.write_bytes(raw[:40])
    elif damage == "garbage":
        file.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "bad_json":
        file.write_bytes((20).to_bytes(8, "little") + b"{not json at all}   " + raw[100:])
    elif damage == "short":
        file.write_bytes(b"\x01\x02")
    else:  # header intact, tensor data cut short
        file.write_bytes(raw[: len(raw) - 1000])
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert str(file) in msg
    if damage == "data_truncated":
        assert "tensor '" in msg
    else:
        assert "header" in msg


def test_header_that_is_not_an_object(mixtral_copy, tmp_path):
    file = mixtral_copy / "model.safetensors"
    header = b"[1, 2, 3]"
    file.write_bytes(len(header).to_bytes(8, "little") + header)
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert str(file) in msg and "header" in msg


def test_index_lists_missing_shard(sharded_mixtral, tmp_path):
    hf_dir = copy_hf(sharded_mixtral, tmp_path / "hf")
    victim = sorted(hf_dir.glob("*.safetensors"))[1]
    victim.unlink()
    msg = _fails(hf_dir, tmp_path / "out")
    assert victim.name in msg and "model.safetensors.index.json" in msg


def test_index_lists_tensor_missing_from_its_shard(sharded_mixtral, tmp_path):
    hf_dir = copy_hf(sharded_mixtral, tmp_path / "hf")
    index_file = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"]["lm_head.weight"]
    index["weight_map"]["model.layers.0.extra.weight"] = shard
    index_file.write_text(json.dumps(index))
    msg = _fails(hf_dir, tmp_path / "out")
    assert "'model.layers.0.extra.weight'" in msg and shard in msg


@pytest.mark.parametrize("content", ["not json", "{}", '{"weight_map": ["a"]}', "[1]"])
def test_unreadable_index(sharded_mixtral, tmp_path, content):
    hf_dir = copy_hf(sharded_mixtral, tmp_path / "hf")
    (hf_dir / "model.safetensors.index.json").write_text(content)
    msg = _fails(hf_dir, tmp_path / "out")
    assert str(hf_dir / "model.safetensors.index.json") in msg


def test_no_safetensors_files(mixtral_copy, tmp_path):
    (mixtral_copy / "model.safetensors").unlink()
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert ".safetensors" in msg and str(mixtral_copy) in msg


def test_unsupported_architecture(mixtral_copy, tmp_path):
    cfg = json.loads((mixtral_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (mixtral_copy / "config.json").write_text(json.dumps(cfg))
    msg = _fails(mixtral_copy, tmp_path / "out", error=(ConversionError, UnsupportedModelError))
    assert "LlamaForCausalLM" in msg
    for arch in SUPPORTED:
        assert arch in msg


def test_missing_config(mixtral_copy, tmp_path):
    (mixtral_copy / "config.json").unlink()
    msg = _fails(mixtral_copy, tmp_path / "out")
    assert "config.json" in msg and str(mixtral_copy) in msg


def test_non_empty_output_dir(hf_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="not empty") as info:
        convert(hf_checkpoints["mixtral"][1], out, progress=False)
    assert str(out) in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert not list(tmp_path.glob(".out.partial-*"))


def test_errors_are_value_errors():
    assert issubclass(ConversionError, ValueError) and issubclass(ckpt.CheckpointError, ValueError)


# ---------------------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("fail_after", [0, 5])
def test_failure_midway_leaves_nothing(hf_checkpoints, tmp_path, monkeypatch, fail_after):
    real = ckpt.write_unit
    calls = []

    def flaky(model_dir, unit, tensors):
        if len(calls) == fail_after:
            # What is already in the hidden directory must not be visible as a checkpoint.
            partial = list(tmp_path.glob(".out.partial-*"))
            assert len(partial) == 1 and not (partial[0] / ckpt.MANIFEST).exists()
            raise OSError("disk full (simulated)")
        calls.append(unit)
        real(model_dir, unit, tensors)

    monkeypatch.setattr(ckpt, "write_unit", flaky)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated"):
        convert(hf_checkpoints["olmoe"][1], out, progress=False)
    assert len(calls) == fail_after
    no_leftovers(out)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(hf_checkpoints, tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_checkpoints["mixtral"][1], tmp_path / "out", progress=False)
    no_leftovers(tmp_path / "out")


def test_directory_without_manifest_is_not_a_checkpoint(converted, tmp_path):
    fake = shutil.copytree(converted["mixtral"], tmp_path / "fake")
    (fake / ckpt.MANIFEST).unlink()
    for call in (ckpt.read_manifest, ckpt.load_config, ckpt.load_params):
        with pytest.raises(ckpt.CheckpointError, match="not a jaxmoe checkpoint") as info:
            call(fake)
        assert ckpt.MANIFEST in str(info.value) and str(fake) in str(info.value)
    with pytest.raises(ckpt.CheckpointError, match="not a jaxmoe checkpoint"):
        ckpt.read_manifest(tmp_path / "does-not-exist")


def test_unknown_manifest_version_is_refused(converted, tmp_path):
    fake = shutil.copytree(converted["mixtral"], tmp_path / "fake")
    manifest = json.loads((fake / ckpt.MANIFEST).read_text())
    manifest["version"] = 999
    (fake / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="999"):
        ckpt.read_manifest(fake)


def test_sigkill_midway_leaves_no_checkpoint(tmp_path):
    hf_dir = synthetic_mixtral(tmp_path / "hf", experts=16, layers=6)
    out = tmp_path / "out"
    code = f"from jaxmoe.convert import convert; convert({str(hf_dir)!r}, {str(out)!r}, progress=False)"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        started = None
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(tmp_path.glob(".out.partial-*"))
            weights = partial[0] / ckpt.WEIGHTS if partial else None
            if weights is not None and weights.is_dir() and any(weights.iterdir()):
                started = partial[0]
                break
            time.sleep(0.005)
        if started is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"conversion never started writing (rc={proc.returncode}): {log.read_text()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "conversion finished before it could be killed; use a larger checkpoint"
    assert not out.exists()
    with pytest.raises(ckpt.CheckpointError, match="not a jaxmoe checkpoint"):
        ckpt.read_manifest(out)
    # The abandoned hidden directory is not a checkpoint either, and a new run is not blocked by it.
    with pytest.raises(ckpt.CheckpointError):
        ckpt.read_manifest(started)
    shutil.rmtree(started)


# ---------------------------------------------------------------------------------------- streaming


def test_conversion_streams_one_unit_at_a_time(hf_checkpoints, tmp_path, monkeypatch):
    """Each write is one unit (one expert, one layer's non-expert tensors, embed or head), and tensors
    are read just before the unit that needs them is written, never all at once."""
    conv = sys.modules["jaxmoe.convert.convert"]  # the package re-exports the function under this name
    reads: list[str] = []
    writes: list[tuple[str, dict[str, tuple[tuple[int, ...], int]], int]] = []
    real_read, real_write = conv.read_tensor, ckpt.write_unit

    raw: list[weakref.ref] = []
    lingering: list[str] = []

    def read(info):
        reads.append(info.name)
        a = real_read(info)
        raw.append(weakref.ref(a))
        return a

    def write(model_dir, unit, tensors):
        writes.append((unit, {k: (v.shape, v.nbytes) for k, v in tensors.items()}, len(reads)))
        # Source arrays that were copied (transposed) must already be freed: only the unit is resident.
        alive = [r() for r in raw if r() is not None]
        lingering.extend(f"{unit}: {a.shape}" for a in alive if not any(a is v or v.base is a for v in tensors.values()))
        real_write(model_dir, unit, tensors)

    monkeypatch.setattr(conv, "read_tensor", read)
    monkeypatch.setattr(ckpt, "write_unit", write)
    _, hf_dir = hf_checkpoints["qwen2_moe"]
    out = tmp_path / "out"
    config = convert(hf_dir, out, progress=False)
    src = source_tensors(hf_dir)

    units = [u for u, _, _ in writes]
    assert len(units) == len(set(units)) == len(ckpt.read_manifest(out)["units"])
    written = 0
    for unit, tensors, reads_so_far in writes:
        assert {ckpt.unit_of(k) for k in tensors} == {unit}
        written += len(tensors)
        assert reads_so_far == written, f"{unit}: {reads_so_far} tensors read but only {written} written"
        if ".experts." in unit:
            assert sorted(k.rsplit(".", 1)[1] for k in tensors) == sorted(EXPERT_NAME)
            assert all(shape == (config.moe_intermediate_size, config.hidden_size) for shape, _ in tensors.values())
        else:
            assert not any(".experts." in k for k in tensors)
    largest_expert = max(sum(n for _, n in t.values()) for u, t, _ in writes if ".experts." in u)
    largest_unit = max(sum(n for _, n in t.values()) for _, t, _ in writes)
    total = sum(a.nbytes for a in src.values())
    assert largest_expert == 3 * config.moe_intermediate_size * config.hidden_size * 4
    assert largest_unit < total / 4
    assert sorted(reads) == sorted(src)
    assert not lingering, f"source arrays kept alive during writes: {lingering[:5]}"


def test_older_checkpoint_format_asks_for_a_new_conversion(converted, tmp_path):
    fake = shutil.copytree(converted["mixtral"], tmp_path / "fake")
    manifest = json.loads((fake / ckpt.MANIFEST).read_text())
    manifest["version"] = ckpt.FORMAT_VERSION - 1
    (fake / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="older jaxmoe.*jaxmoe convert"):
        ckpt.load_params(fake)
