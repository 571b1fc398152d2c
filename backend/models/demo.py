"""A tiny random-weight SDXL refiner and base, saved as diffusers folders like the real repositories.

The demo models have the real SDXL 1.0 *structure* (4-level refiner UNet with aesthetic-score time
ids, 3-level base UNet with two text encoders, 4-level VAE so the scale factor is 8, CLIP BPE
tokenizers with the real file layout) at toy widths, so they load through exactly the same
``from_pretrained`` call as the real models, offline, in well under a second. Their output is
noise-like: they exist to exercise the whole path, not to make pictures.

    python -m krita_sdxl.backend.models.demo [DIR]     # build (if missing) and print the paths
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_NAME = "demo-v1"  # bump when the demo architecture or weights change
SEED = 20261126

# The scheduler configuration of the real SDXL 1.0 refiner and base.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

TIME_EMBED = 8  # addition_time_embed_dim (real: 256)
TE2_HIDDEN = 32  # text_encoder_2 hidden size and projection dim (real: 1280)
TE1_HIDDEN = 16  # base text_encoder hidden size (real: 768)
# Weights come from torch's global generator (the classes' own initialisers), seeded per build; the
# lock keeps two builds in one process from drawing from it at the same time.
_INIT_LOCK = threading.Lock()
WORDS: tuple[str, ...] = tuple(
    (
        "a an the of on in with and photo painting portrait landscape astronaut riding horse mars cat dog "
        "red blue green sky forest city night detailed sharp blurry ugly"
    ).split()
)


@dataclass(frozen=True)
class DemoPaths:
    refiner: Path
    base: Path


def default_cache_dir() -> Path:
    """``$KRITA_SDXL_CACHE``, else ``~/.cache/krita-sdxl``."""
    env = os.environ.get("KRITA_SDXL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "krita-sdxl"


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(refiner=root / "refiner", base=root / "base")


def _complete(root: Path) -> bool:
    paths = _paths(root)
    return all((p / "model_index.json").is_file() for p in (paths.refiner, paths.base))


def ensure_demo_models(cache_dir: Path | None = None) -> DemoPaths:
    """Return the demo model folders under ``cache_dir``, building them first if missing.

    Safe against concurrent builders: each builds in its own temporary folder beside the target and
    renames it into place; a builder that loses the race discards its copy and uses the winner's.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / DEMO_NAME
    if _complete(root):
        return _paths(root)
    cache.mkdir(parents=True, exist_ok=True)
    if root.exists():  # incomplete (damaged by hand?): move it aside atomically, then rebuild
        trash = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.broken-", dir=cache))
        try:
            os.replace(root, trash / DEMO_NAME)
        except OSError:
            pass  # someone else moved or replaced it meanwhile
        shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=cache))
    try:
        _build(_paths(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache folder is not
        try:
            os.rename(tmp, root)
        except OSError:
            if not _complete(root):  # the rename failed for another reason than a finished rival
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)


# --- tokenizers ---------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_vocab(words: tuple[str, ...] | list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP BPE vocabulary: every byte character with and without ``</w>`` (so any text
    tokenizes), whole-word tokens for ``words`` with the merges that build them left to right, and
    the two special tokens last, in the order of the real vocabulary."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars)]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                tokens.append(merged)
                seen.add(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _special(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """Write a tokenizer folder laid out like the real SDXL repositories."""
    vocab, merges = build_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pad = pad_token if pad_token == "!" else _special(pad_token)
    special = {
        "bos_token": _special("<|startoftext|>"),
        "eos_token": _special("<|endoftext|>"),
        "pad_token": pad,
        "unk_token": _special("<|endoftext|>"),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# --- models -------------------------------------------------------------------------------------


def _text_config(hidden: int, heads: int, act: str, vocab: dict[str, int], pad_token: str) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden + 5,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab[pad_token],
    )


def _unet(levels: int, cross_attention_dim: int, time_ids: int) -> Any:
    from diffusers import UNet2DConditionModel

    if levels == 4:  # the refiner's layout
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        channels, heads = (16, 32, 32, 32), (1, 2, 2, 2)
    else:  # the base's layout
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        channels, heads = (16, 32, 32), (1, 2, 2)
    # A config dict, as diffusers builds models from config.json (its annotations say tuple[int] for any length).
    config: dict[str, Any] = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        transformer_layers_per_block=1,
        attention_head_dim=heads,  # diffusers' name for the head counts
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TE2_HIDDEN + time_ids * TIME_EMBED,
    )
    return UNet2DConditionModel(**config)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    config: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    return AutoencoderKL(**config)


def _build(paths: DemoPaths) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, _ = build_vocab()
    staging = paths.refiner.parent / "tokenizers"
    write_tokenizer(staging / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer(staging / "tokenizer_2", pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(staging / "tokenizer_2")

    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vae = _vae().eval()
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(TE2_HIDDEN, 4, "gelu", vocab, "!")).eval()
        refiner_unet = _unet(4, TE2_HIDDEN, time_ids=5).eval()
        text_encoder = CLIPTextModel(_text_config(TE1_HIDDEN, 2, "quick_gelu", vocab, "<|endoftext|>")).eval()
        base_unet = _unet(3, TE1_HIDDEN + TE2_HIDDEN, time_ids=6).eval()

    # Keyword dicts: the refiner has no first text encoder (None), which diffusers' annotations do not allow.
    refiner_parts: dict[str, Any] = dict(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=refiner_unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(**refiner_parts)
    base_parts: dict[str, Any] = dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=base_unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    base = StableDiffusionXLPipeline(**base_parts)
    refiner.save_pretrained(paths.refiner)
    base.save_pretrained(paths.base)
    # transformers 5 saves tokenizer.json only; ship the real repositories' four files instead.
    for folder, name in ((paths.refiner, "tokenizer_2"), (paths.base, "tokenizer"), (paths.base, "tokenizer_2")):
        shutil.rmtree(folder / name)
        shutil.copytree(staging / name, folder / name)
    shutil.rmtree(staging)
    _check_model_index(paths.refiner)


def _check_model_index(folder: Path) -> None:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    expected = {"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}
    wrong = {k: index.get(k) for k, v in expected.items() if index.get(k) != v}
    if wrong or index.get("text_encoder") != [None, None] or index.get("tokenizer") != [None, None]:
        raise RuntimeError(f"demo refiner model_index.json is not laid out like the real refiner: {index}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m krita_sdxl.backend.models.demo [CACHE_DIR]", file=sys.stderr)
        return 2
    paths = ensure_demo_models(Path(args[0]) if args else None)
    print(f"refiner: {paths.refiner}")
    print(f"base:    {paths.base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
