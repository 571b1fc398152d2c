"""Write a diffusers SDXL folder as a single-file checkpoint in the original (SGM / LDM) key layout,
the layout of ``sd_xl_base_1.0.safetensors`` and ``sd_xl_refiner_1.0.safetensors``.

Test support: the tests turn the tiny demo models into single files and load them back through
``from_single_file``, which converts the other way with diffusers' own code. The key names follow
Stability AI's ``generative-models`` modules (``UNetModel``, ``AutoencoderKL``, OpenCLIP); block
numbering is derived from the UNet's config, so any depth works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
_RESNET |= {"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix, for every block of a UNet2DConditionModel."""
    levels = len(config["block_out_channels"])
    per = config["layers_per_block"]
    down_attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, str] = {}
    n = 1
    for i in range(levels):
        for j in range(per):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            if down_attn[i]:
                out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
            n += 1
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{n}.0.op."
            n += 1
    out["mid_block.resnets.0."] = "middle_block.0."
    out["mid_block.attentions.0."] = "middle_block.1."
    out["mid_block.resnets.1."] = "middle_block.2."
    n = 0
    for i in range(levels):
        for j in range(per + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            if up_attn[i]:
                out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
            if i < levels - 1 and j == per:
                out[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{n}.{2 if up_attn[i] else 1}.conv."
            n += 1
    return out


def convert_unet(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefixes(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = value
            continue
        for old, new in prefixes.items():
            if key.startswith(old):
                rest = key[len(old) :]
                out[new + (_rename_resnet(rest) if ".resnets." in old else rest)] = value
                break
        else:
            raise KeyError(f"no SGM name for UNet weight {key}")
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def convert_vae(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for part in ("encoder", "decoder"):
            k = k.replace(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.")
            k = k.replace(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")
        for i in range(levels):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        if ".mid_block.attentions.0." in k:
            k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for old, new in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v.")):
                k = k.replace(old, new)
            k = k.replace("to_out.0.", "proj_out.")
            if value.ndim == 2:  # linear in diffusers, 1x1 convolution in SGM
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def convert_open_clip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP's layout (fused q/k/v, transposed projection)."""
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers.") :]
            index, _, name = rest.partition(".")
            base = f"transformer.resblocks.{index}."
            if name.startswith("self_attn.") and name.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault(f"{base}attn.in_proj_{name.rsplit('.', 1)[1]}", {})[name.split(".")[1]] = value
                continue
            name = name.replace("self_attn.out_proj.", "attn.out_proj.").replace("layer_norm1.", "ln_1.")
            name = name.replace("layer_norm2.", "ln_2.").replace("mlp.fc1.", "mlp.c_fc.")
            out[base + name.replace("mlp.fc2.", "mlp.c_proj.")] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder weight {key}")
    for key, parts in layers.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {prefix + k: v for k, v in out.items()}


def write_single_file(folder: Path, target: Path) -> Path:
    """Write the diffusers SDXL pipeline in ``folder`` (refiner or base) as one SGM safetensors file."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    unet_config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    sd = convert_unet(_weights(folder / "unet"), unet_config)
    sd |= convert_vae(_weights(folder / "vae"), vae_config)
    has_clip_l = index.get("text_encoder", [None])[0] is not None
    if has_clip_l:  # base: embedders.0 is CLIP ViT-L (transformers layout), embedders.1 OpenCLIP bigG
        clip_l = _weights(folder / "text_encoder")
        # transformers >= 5.6 saves CLIPTextModel without its "text_model." level; the original has it
        clip_l = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip_l.items()}
        sd |= {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()}
    bigg_prefix = "conditioner.embedders.1.model." if has_clip_l else "conditioner.embedders.0.model."
    sd |= convert_open_clip(_weights(folder / "text_encoder_2"), bigg_prefix)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(target))
    return target
