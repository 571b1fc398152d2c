"""Model sources: diffusers folders, single-file checkpoints with shipped configs, the lazy base,
sharing between base and refiner, unloading and loading again."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from krita_sdxl.backend.engine.request import RefineRequest
from krita_sdxl.backend.engine.sdxl_engine import Engine
from krita_sdxl.backend.engine.stages import plan_job
from krita_sdxl.backend.models.pipelines import load_pipeline, shareable
from krita_sdxl.backend.models.refiner import ModelNotFound
from krita_sdxl.backend.models.sources import CONFIGS, SHIPPED_CONFIGS, ModelSource, resolve_base, resolve_source
from krita_sdxl.protocol import Image, ImageSpec

sys.path.insert(0, str(Path(__file__).parent))
from sgm_checkpoint import write_single_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def single_files(demo_models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo refiner and base written as single-file SGM checkpoints, like sd_xl_*_1.0.safetensors."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "refiner": write_single_file(demo_models.refiner, folder / "tiny_refiner.safetensors"),
        "base": write_single_file(demo_models.base, folder / "tiny_base.safetensors"),
    }


def image(width: int = 64, height: int = 48) -> Image:
    data = np.random.default_rng(5).integers(0, 256, (height, width, 4), dtype=np.uint8)
    data[..., 3] = 255
    return Image(ImageSpec(width, height, "RGBA", 8), data.tobytes())


def job(engine: Engine, mode: str, strength: float = 0.5) -> bytes:
    plan, stages = plan_job(mode, 10, strength, 0.8, engine.timesteps)
    req = RefineRequest(
        image=image(),
        prompt="a red cat",
        negative_prompt="",
        strength=strength,
        plan=plan,
        seed=11,
        guidance_scale=5.0,
        aesthetic_score=6.0,
        negative_aesthetic_score=2.5,
        mode=mode,
        stages=stages,
    )
    return bytes(engine.refine(req, lambda *a: None, lambda: False).data)


# --- finding models -----------------------------------------------------------------------------


def test_sources_of_each_kind(demo_models: Any, single_files: dict[str, Path], tmp_path: Path) -> None:
    folder = resolve_source("refiner", str(demo_models.refiner))
    assert (folder.kind, folder.path) == ("folder", demo_models.refiner)
    single = resolve_source("base", str(single_files["base"]))
    assert (single.kind, single.config) == ("single_file", SHIPPED_CONFIGS["base"])
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(ModelNotFound, match=r"not a \.safetensors checkpoint"):
        resolve_source("refiner", str(ckpt))
    with pytest.raises(ModelNotFound, match=r"has no model_index\.json"):
        resolve_source("refiner", str(single_files["refiner"]), config=tmp_path)
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        resolve_source("base", "nobody/no-such-model")


def test_the_base_is_optional(demo_models: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: no SDXL base in it
    assert resolve_base(None) is None  # absent default base: refine only, no error
    assert resolve_base("none", demo=True) is None
    assert resolve_base(None, demo=True).kind == "demo"
    with pytest.raises(ModelNotFound):  # but a base that was asked for must exist
        resolve_base(str(tmp_path / "missing"))


# --- the shipped SDXL 1.0 configs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("refiner", {"unet": 2259.5, "vae": 83.7, "text_encoder_2": 694.7}),
        ("base", {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}),
    ],
)
def test_shipped_configs_describe_the_real_models(role: str, expected: dict[str, float]) -> None:
    """Parameter counts of the architectures the configs build (on the meta device) match the real
    SDXL 1.0 models (FACTS.md section 1), in millions."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = SHIPPED_CONFIGS[role]
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
        ),
    }
    for name, millions in expected.items():
        with init_empty_weights():
            model = builders[name]()
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - millions) < 0.1, (name, count)


def test_shipped_tokenizers_are_clips() -> None:
    from transformers import CLIPTokenizer

    for folder in (SHIPPED_CONFIGS["base"] / "tokenizer", SHIPPED_CONFIGS["refiner"] / "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(folder)
        ids = tok("a photo of an astronaut riding a horse on mars").input_ids
        assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
        assert len(tok) == 49408 and tok.model_max_length == 77
    assert CLIPTokenizer.from_pretrained(SHIPPED_CONFIGS["refiner"] / "tokenizer_2").pad_token == "!"


def test_every_shipped_config_file_is_packaged() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = globs["krita_sdxl.backend.models"]
    files = [p.relative_to(CONFIGS.parent).as_posix() for p in CONFIGS.rglob("*") if p.is_file()]
    assert len(files) >= 20
    for f in files:
        assert any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns), f


# --- loading --------------------------------------------------------------------------------------


def test_demo_base_and_refiner_share_vae_and_text_encoder_2(demo_models: Any) -> None:
    for name, file in (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder_2", "model.safetensors")):
        a, b = load_file(demo_models.refiner / name / file), load_file(demo_models.base / name / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    refiner = load_pipeline(resolve_source("refiner", demo=True), torch.float32, torch.float32)
    base_source = resolve_source("base", demo=True)
    shared = shareable(base_source, refiner)
    assert sorted(shared) == ["text_encoder_2", "tokenizer_2", "vae"]
    base = load_pipeline(base_source, torch.float32, torch.float32, shared)
    assert base.vae is refiner.vae and base.text_encoder_2 is refiner.text_encoder_2


@pytest.mark.parametrize("role", ["refiner", "base"])
def test_single_file_loads_the_same_weights(demo_models: Any, single_files: dict[str, Path], role: str) -> None:
    """A checkpoint in the original key layout, loaded with from_single_file and a config folder,
    gives exactly the weights of the diffusers folder it was written from."""
    folder = getattr(demo_models, role)
    pipe = load_pipeline(
        ModelSource(role, "single_file", single_files[role], "tiny", folder), torch.float32, torch.float32
    )
    reference = load_pipeline(ModelSource(role, "folder", folder, "tiny"), torch.float32, torch.float32)
    names = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if role == "base" else [])
    for name in names:
        mine, theirs = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), name


def test_single_file_engine_matches_the_folder_engine(demo_models: Any, single_files: dict[str, Path]) -> None:
    cache = demo_models.refiner.parent.parent
    from_files = Engine.load(
        model=str(single_files["refiner"]),
        model_config=str(demo_models.refiner),
        base_model=str(single_files["base"]),
        base_model_config=str(demo_models.base),
        device="cpu",
        cache_dir=cache,
        speed="off",
    )
    from_folders = Engine.load(demo=True, device="cpu", cache_dir=cache, speed="off")
    assert [m["source"] for m in from_files.describe()["models"]] == ["single_file", "single_file"]
    assert from_files.describe()["modes"] == ["refine", "generate", "two_stage"]
    assert job(from_files, "generate") == job(from_folders, "generate")  # VAE, base img2img, refiner


def test_unload_frees_and_the_next_job_loads_again(demo_models: Any) -> None:
    engine = Engine.load(demo=True, device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="off")
    first = job(engine, "generate")
    base_unet = engine.models.get("base").unet
    assert engine.unload("base") == (True, False)
    assert engine.unload("base") == (False, False)  # already gone
    assert [m["loaded"] for m in engine.live_capabilities()["models"]] == [True, False]
    assert engine.vae is engine.pipe.vae  # the refiner still holds the shared VAE
    assert job(engine, "generate") == first  # loaded again, same pixels
    assert engine.models.get("base").unet is not base_unet
    assert engine.unload("refiner") == (True, False)
    assert not engine.models.loaded("refiner")
    assert job(engine, "refine") == job(engine, "refine")
    assert engine.models.loaded("refiner")


def test_without_a_base_only_refine_is_offered(demo_models: Any) -> None:
    engine = Engine.load(
        demo=True, base_model="none", device="cpu", cache_dir=demo_models.refiner.parent.parent, speed="off"
    )
    info = engine.describe()
    assert info["modes"] == ["refine"]
    assert [m["role"] for m in info["models"]] == ["refiner"]
