"""Device and dtype choice, finding and loading the refiner, and the demo model folders."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.models import refiner as models
from krita_sdxl.backend.models.demo import DEMO_NAME, ensure_demo_models
from krita_sdxl.backend.models.refiner import ModelNotFound, pick_device, pick_dtypes, resolve_refiner

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# --- device and dtype ---------------------------------------------------------------------------


def test_pick_device() -> None:
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match=r"'tpu' is not available.*available: .*cpu"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_names_what_is_available() -> None:
    with pytest.raises(ValueError, match=r"device 'cuda' is not available on this machine; available: .*cpu"):
        pick_device("cuda")


def test_pick_dtypes_cpu_and_mps() -> None:
    assert pick_dtypes("cpu") == (F32, F32)
    assert pick_dtypes("cpu", "bf16") == (BF16, F32)
    assert pick_dtypes("cpu", "fp16") == (F16, F32)
    assert pick_dtypes("mps") == (F16, F32)
    with pytest.raises(ValueError, match="dtype must be"):
        pick_dtypes("cpu", "int8")


@pytest.mark.parametrize(("bf16_ok", "vae"), [(True, BF16), (False, F32)])
def test_pick_dtypes_cuda_never_puts_the_vae_in_fp16(monkeypatch: pytest.MonkeyPatch, bf16_ok: bool, vae: Any) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert pick_dtypes("cuda") == (F16, vae)
    assert pick_dtypes("cuda:0", "fp16") == (F16, vae)
    assert pick_dtypes("cuda", "bf16") == (BF16, vae)
    assert pick_dtypes("cuda", "fp32") == (F32, F32)


# --- finding the refiner ------------------------------------------------------------------------


def test_resolve_demo_and_folders(demo_models: Any, krita_sdxl_cache: Path) -> None:
    assert resolve_refiner(demo=True) == demo_models.refiner  # KRITA_SDXL_CACHE is the default cache
    assert resolve_refiner(str(demo_models.refiner)) == demo_models.refiner


def test_missing_or_wrong_folders_say_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFound, match=r"no-such-model does not exist.*--model PATH.*--demo"):
        resolve_refiner(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match=r"has no model_index.json.*--model PATH.*--demo"):
        resolve_refiner(str(tmp_path / "empty"))
    checkpoint = tmp_path / "sd_xl_refiner_1.0.safetensors"
    checkpoint.write_bytes(b"x")
    with pytest.raises(ModelNotFound, match=r"is a file.*single-file checkpoints are not supported.*--demo"):
        resolve_refiner(str(checkpoint))
    with pytest.raises(ModelNotFound, match=r"nowhere/at/all does not exist"):
        resolve_refiner("nowhere/at/all")  # not an owner/name repo id, so a path


@pytest.mark.parametrize("model", [None, "someone/not-downloaded"])
def test_repo_not_in_the_hf_cache_gives_every_way_out(empty_hf_cache: Path, model: str | None) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_refiner(model, allow_download=False)
    text = str(info.value)
    repo = model or models.DEFAULT_REFINER
    assert f"model '{repo}' is not in the local Hugging Face cache ({empty_hf_cache})" in text
    for hint in (f"hf download {repo}", "--allow-download", "--model PATH", "--demo"):
        assert hint in text
    assert not any(empty_hf_cache.iterdir())  # nothing was fetched or created


def fake_hf_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay a folder out as the Hugging Face hub cache does after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


def test_a_cached_repo_id_loads_through_the_same_path(empty_hf_cache: Path, demo_models: Any) -> None:
    snapshot = fake_hf_snapshot(empty_hf_cache, "someone/tiny-refiner", demo_models.refiner)
    assert resolve_refiner("someone/tiny-refiner") == snapshot
    engine = Engine.load(model="someone/tiny-refiner", device="cpu")
    assert engine.path == snapshot
    assert engine.describe()["models"][0]["name"] == "someone/tiny-refiner"


def test_fp16_variant_only_folder_loads_in_fp32(tmp_path: Path, demo_models: Any) -> None:
    pipe = models.load_refiner(demo_models.refiner, "cpu", F32, F32)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert models.weight_variants(tmp_path / "fp16") == (True, False)
    assert models.weight_variants(demo_models.refiner) == (False, True)
    loaded = models.load_refiner(tmp_path / "fp16", "cpu", F32, F32)
    assert loaded.unet.dtype == F32 and loaded.vae.dtype == F32
    for a, b in zip(pipe.unet.parameters(), loaded.unet.parameters(), strict=True):
        assert torch.equal(a, b)


# --- the demo models ----------------------------------------------------------------------------


def test_demo_refiner_is_laid_out_like_the_real_one(demo_models: Any) -> None:
    index = json.loads((demo_models.refiner / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["requires_aesthetics_score"] is True
    assert index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    expected = {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}
    for folder in (
        demo_models.refiner / "tokenizer_2",
        demo_models.base / "tokenizer",
        demo_models.base / "tokenizer_2",
    ):
        assert {p.name for p in folder.iterdir()} == expected
    config = json.loads((demo_models.refiner / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "!"
    unet = json.loads((demo_models.refiner / "unet" / "config.json").read_text())
    assert len(unet["block_out_channels"]) == 4 and unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 32 + 5 * unet["addition_time_embed_dim"]
    base_unet = json.loads((demo_models.base / "unet" / "config.json").read_text())
    assert len(base_unet["block_out_channels"]) == 3 and base_unet["cross_attention_dim"] == 16 + 32
    vae = json.loads((demo_models.refiner / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4 and vae["scaling_factor"] == 0.13025 and vae["force_upcast"]
    same = (demo_models.refiner / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert same == (demo_models.base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_any_prompt_tokenizes_and_prompts_differ(demo_models: Any) -> None:
    pipe = models.load_refiner(demo_models.refiner, "cpu", F32, F32)
    tok = pipe.tokenizer_2
    prompts = ["a photo of a cat", "a photo of a dog", "Zebra! naïve 日本 ~~", ""]
    ids = [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]
    assert all(len(i) == 77 for i in ids)
    assert len({tuple(i) for i in ids}) == len(prompts)
    assert tok.convert_tokens_to_ids("photo</w>") != tok.unk_token_id  # whole words are single tokens
    assert ids[0][1:4] == tok.convert_tokens_to_ids(["a</w>", "photo</w>", "of</w>"])
    with torch.inference_mode():
        embeds = [pipe.encode_prompt(p, do_classifier_free_guidance=False)[2] for p in prompts]
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            assert not torch.allclose(embeds[i], embeds[j])


def test_demo_build_is_idempotent_deterministic_and_race_safe(tmp_path: Path, demo_models: Any) -> None:
    results: list[Any] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_demo_models(tmp_path))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results[0] == results[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_NAME]  # no temporary folders left
    weights = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (results[0].refiner / weights).read_bytes() == (demo_models.refiner / weights).read_bytes()
    stamp = (results[0].refiner / weights).stat().st_mtime_ns
    assert ensure_demo_models(tmp_path) == results[0]
    assert (results[0].refiner / weights).stat().st_mtime_ns == stamp  # not rebuilt


def test_a_damaged_demo_folder_is_rebuilt(tmp_path: Path) -> None:
    paths = ensure_demo_models(tmp_path)
    (paths.base / "model_index.json").unlink()
    again = ensure_demo_models(tmp_path)
    assert (again.base / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_NAME]
