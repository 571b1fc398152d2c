"""Write the SDXL 1.0 base and refiner diffusers *configuration* folders shipped in backend/models/configs/.

``from_single_file`` needs a diffusers config folder (model_index.json, every component's config,
the tokenizer files) to turn ``sd_xl_base_1.0.safetensors`` / ``sd_xl_refiner_1.0.safetensors``
into pipelines; without one it downloads them from the Hub at load time. This script writes those
folders once, offline, from what is known about the real models (../shared/docs/FACTS.md section 1)
and the CLIP BPE vocabulary that ships inside the ``open-clip-torch`` wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``, OpenAI's original file, MIT licence). The vocabulary
and merges are built from it exactly as Hugging Face's ``CLIPTokenizer`` files are (49,408 tokens).

    pip download open-clip-torch==3.3.0 --no-deps -d /tmp/oc
    unzip -p /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz > /tmp/bpe.txt.gz
    python packaging/make_sdxl_configs.py /tmp/bpe.txt.gz backend/models/configs
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

from krita_sdxl.backend.models.demo import SCHEDULER_CONFIG, bytes_to_unicode, write_tokenizer

REFINER_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(384, 768, 1536, 1536),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4,
    attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)
BASE_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# The real repositories keep CLIP's legacy special-token ids in these configs (bos 0, eos 2, pad 1).
_CLIP_COMMON: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
)
CLIP_L: dict[str, Any] = dict(
    _CLIP_COMMON,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_G: dict[str, Any] = dict(
    _CLIP_COMMON,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)
BASE_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
REFINER_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "force_zeros_for_empty_prompt": False,
    "requires_aesthetics_score": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": [None, None],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def clip_bpe(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges from OpenAI's BPE file, as in its SimpleTokenizer."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != 49408:
        raise ValueError(f"{bpe_gz} gives {len(tokens)} tokens, CLIP has 49408")
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _model_config(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(**kwargs)
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_use_default")} | {
        "_class_name": cls.__name__
    }


def _text_config(cls_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from transformers import CLIPTextConfig

    data = CLIPTextConfig(**kwargs).to_diff_dict()
    data["architectures"] = [cls_name]
    data.pop("transformers_version", None)
    return data


def _tokenizer(folder: Path, pad: str, vocab: dict[str, int], merges: list[str]) -> None:
    write_tokenizer(folder, pad)  # the real repositories' special-token files; vocabulary replaced below
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")


def write_configs(bpe_gz: Path, out: Path) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    vocab, merges = clip_bpe(bpe_gz)
    vae = _model_config(AutoencoderKL, VAE)
    scheduler = dict(EulerDiscreteScheduler(**SCHEDULER_CONFIG).config) | {"_class_name": "EulerDiscreteScheduler"}
    te2 = _text_config("CLIPTextModelWithProjection", CLIP_G)
    for name, index, unet in (
        ("sdxl-base-1.0", BASE_INDEX, BASE_UNET),
        ("sdxl-refiner-1.0", REFINER_INDEX, REFINER_UNET),
    ):
        root = out / name
        _write_json(root / "model_index.json", index)
        _write_json(root / "unet" / "config.json", _model_config(UNet2DConditionModel, unet))
        _write_json(root / "vae" / "config.json", vae)
        _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
        _write_json(root / "text_encoder_2" / "config.json", te2)
        _tokenizer(root / "tokenizer_2", "!", vocab, merges)
        if index["text_encoder"][0] is not None:
            _write_json(root / "text_encoder" / "config.json", _text_config("CLIPTextModel", CLIP_L))
            _tokenizer(root / "tokenizer", "<|endoftext|>", vocab, merges)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_sdxl_configs.py BPE_SIMPLE_VOCAB_16E6.TXT.GZ OUT_DIR")
    write_configs(Path(sys.argv[1]), Path(sys.argv[2]))
