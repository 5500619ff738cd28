"""The built-in tiny models: random-weight Wan checkpoints, built locally, for CPUs and tests.

- ``tiny-wan``: Wan2.1 text-to-video in miniature (16 latent channels, an 8x VAE).
- ``tiny-wan-ti2v``: Wan2.2-TI2V-5B's shapes in miniature: text-and-image-to-video, a 48-channel
  latent, the residual Wan2.2 VAE that patchifies 2x2 and compresses 16x in all, and
  ``expand_timesteps`` (the image's latent replaces the first frame's). Sizes are multiples of 32.

Each is a ``WanRecipe`` (``RECIPES``); ``build_checkpoint`` builds any recipe (``bench/gpu_smoke.py``
builds one in Wan2.1-T2V-1.3B's shapes). Both are built without hub access, deterministically
(seeded), and cached on disk after the first build. They render noise, but through exactly the
same code path as the real models: UMT5 text encoder, WanTransformer3DModel, AutoencoderKLWan
and a flow-matching UniPC scheduler, saved in diffusers format and loaded back with ``from_pretrained``.

The checkpoint directory name carries a version: change ``BUILD_VERSION`` whenever a recipe
changes so that stale caches are never reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TINY_WAN_ID", "TINY_TI2V_ID", "TINY_MODELS", "BUILD_VERSION", "RECIPES", "WanRecipe", "build_checkpoint",
           "ensure_built", "ensure_tiny_wan", "ensure_tiny_model", "tiny_wan_path", "tiny_model_path"]  # fmt: skip

TINY_WAN_ID = "tiny-wan"
TINY_TI2V_ID = "tiny-wan-ti2v"
TINY_MODELS = (TINY_WAN_ID, TINY_TI2V_ID)
BUILD_VERSION = "v1"
_SEED = 20261122

# A fixed vocabulary: deterministic (training a tokenizer is not), and every character a prompt
# is likely to use is a piece of its own, so any text tokenizes without hitting <unk> often.
_WORDS = (
    "a the of and in on with at to from video cat dog bird city street night day sun sky sea "
    "river forest mountain snow rain fire car train robot person walking running flying "
    "slowly quickly red green blue white black golden light dark camera shot close wide"
).split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"


def tiny_model_path(model_id: str, cache_dir: Path) -> Path:
    """Where the checkpoint of ``model_id`` (one of ``TINY_MODELS``) of this build version lives."""
    if model_id not in TINY_MODELS:
        raise ValueError(f"{model_id!r} is not a built-in model; built in: {', '.join(TINY_MODELS)}")
    return Path(cache_dir) / f"{model_id}-{BUILD_VERSION}"


def tiny_wan_path(cache_dir: Path) -> Path:
    return tiny_model_path(TINY_WAN_ID, cache_dir)


def ensure_tiny_wan(cache_dir: Path) -> Path:
    return ensure_tiny_model(TINY_WAN_ID, cache_dir)


def ensure_tiny_model(model_id: str, cache_dir: Path) -> Path:
    """Return the checkpoint directory of ``model_id``, building it first if it is not cached yet."""
    return ensure_built(tiny_model_path(model_id, cache_dir), RECIPES[model_id])


def ensure_built(target: Path, recipe: WanRecipe, device: str = "cpu") -> Path:
    """Return ``target``, building ``recipe`` there first if it holds no checkpoint yet.

    Safe against concurrent builders: each builds in a private temporary directory and the
    first atomic rename wins.
    """
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    try:
        build_checkpoint(tmp, recipe, device=device)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _vocab() -> list[tuple[str, float]]:
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in _WORDS]
    pieces += [(ch, -5.0) for ch in _CHARS]
    return pieces


@dataclass(frozen=True)
class WanRecipe:
    """The shapes of a random-weight Wan checkpoint: keyword arguments of each diffusers/transformers
    class, the scheduler's flow shift, and the dtype the weights are saved in."""

    text_encoder: dict[str, Any]
    transformer: dict[str, Any]
    vae: dict[str, Any]
    flow_shift: float
    expand_timesteps: bool = False
    dtype: str = "float32"
    seed: int = _SEED


_TINY_TEXT_ENCODER = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                      "relative_attention_num_buckets": 8}  # fmt: skip
_TINY_TRANSFORMER = {"num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "freq_dim": 256,
                     "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 1024}  # fmt: skip
# fmt: off
RECIPES = {
    TINY_WAN_ID: WanRecipe(
        text_encoder=_TINY_TEXT_ENCODER,
        transformer={**_TINY_TRANSFORMER, "in_channels": 16, "out_channels": 16},
        vae={"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
             "temperal_downsample": [False, True, True]},
        flow_shift=3.0,
    ),
    # Wan2.2's VAE: 3x2x2 pixels patched into 12 channels, 48 latent channels, 16x in all
    TINY_TI2V_ID: WanRecipe(
        text_encoder=_TINY_TEXT_ENCODER,
        transformer={**_TINY_TRANSFORMER, "in_channels": 48, "out_channels": 48},
        vae={"base_dim": 4, "decoder_base_dim": 4, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
             "temperal_downsample": [False, True, True], "is_residual": True, "in_channels": 12,
             "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
             "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48},
        flow_shift=5.0,
        expand_timesteps=True,
        seed=_SEED + 1,
    ),
}
# fmt: on


def build_checkpoint(out: Path, recipe: WanRecipe, device: str = "cpu") -> None:
    """Build a random-weight Wan checkpoint of ``recipe``'s shapes into ``out`` (diffusers format,
    loadable by FastVideo too); the modules are made on ``device``, then saved in ``recipe.dtype``."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(recipe.seed)
    dtype = getattr(torch, recipe.dtype)
    tokenizer = T5Tokenizer(vocab=_vocab(), extra_ids=0)
    with torch.device(device):
        config = {"vocab_size": len(tokenizer), "feed_forward_proj": "gated-gelu", "pad_token_id": 0,
                  "eos_token_id": 1, "decoder_start_token_id": 0, **recipe.text_encoder}  # fmt: skip
        text_encoder = UMT5EncoderModel(UMT5Config(**config))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), cross_attn_norm=True, qk_norm="rms_norm_across_heads", **recipe.transformer
        )
        vae = AutoencoderKLWan(**recipe.vae)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=recipe.flow_shift
    )
    if dtype != torch.float32:  # the weights that dominate the checkpoint's size; the VAE stays float32
        text_encoder, transformer = text_encoder.to(dtype), transformer.to(dtype)  # type: ignore[attr-defined]  # nn.Module.to, through ModelMixin
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        expand_timesteps=recipe.expand_timesteps,
    )  # fmt: skip
    pipe.save_pretrained(out)  # type: ignore[attr-defined]  # provided by DiffusionPipeline's mixin
    _make_fastvideo_loadable(out, keep_expand_timesteps=recipe.expand_timesteps)


def _make_fastvideo_loadable(out: Path, keep_expand_timesteps: bool) -> None:
    """Trim config keys that FastVideo 0.2.1's loader does not know (see FIELD_NOTES.md); it reads
    (and pops) a true ``expand_timesteps``, which diffusers needs to render Wan2.2-TI2V."""
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    for key in ("transformer_2", "boundary_ratio") + (() if keep_expand_timesteps else ("expand_timesteps",)):
        index.pop(key, None)
    index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    sched_path = out / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text())
    for key in ("shift_terminal", "sigma_min", "sigma_max"):
        sched.pop(key, None)
    sched_path.write_text(json.dumps(sched, indent=2, sort_keys=True) + "\n")
