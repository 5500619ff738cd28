"""The built-in tiny-wan checkpoint: deterministic, offline, loadable, and renders the asked shape."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.engines.tiny_wan import ensure_tiny_wan, tiny_wan_path


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_build_is_deterministic_and_cached(tmp_path, model_cache):
    built = ensure_tiny_wan(tmp_path)
    assert built == tiny_wan_path(tmp_path)
    assert digest_tree(built) == digest_tree(tiny_wan_path(model_cache))
    size = sum(p.stat().st_size for p in built.rglob("*") if p.is_file())
    assert size < 1_000_000
    stamp = (built / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_wan(tmp_path) == built
    assert (built / "model_index.json").stat().st_mtime_ns == stamp  # cached: not rebuilt
    assert not list(tmp_path.glob(".tiny-wan-build-*"))


def test_configs_are_trimmed_for_fastvideos_loader(model_cache):
    root = tiny_wan_path(model_cache)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["tokenizer"] == ["transformers", "T5TokenizerFast"]
    assert not {"transformer_2", "boundary_ratio", "expand_timesteps"} & set(index)
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert not {"shift_terminal", "sigma_min", "sigma_max"} & set(scheduler)
    assert scheduler["prediction_type"] == "flow_prediction"


def test_diffusers_engine_renders_the_requested_shape(model_cache, monkeypatch):
    from tasks.engines.diffusers_engine import DiffusersEngine
    from worker_config.settings import Settings

    engine = DiffusersEngine(Settings(MODEL_ID="tiny-wan", MODEL_CACHE_DIR=model_cache))
    stages: list[tuple] = []
    spec = {
        "prompt": "a cat", "negative_prompt": "", "num_frames": 5, "height": 32, "width": 48,
        "num_inference_steps": 2, "guidance_scale": 5.0, "seed": 1, "fps": 8, "model": "tiny-wan",
    }  # fmt: skip
    first = engine.render(spec, lambda *a: stages.append(a))
    second = engine.render(spec, lambda *a: None)
    engine.close()
    assert first.frames.shape == (5, 32, 48, 3)
    assert (first.frames == second.frames).all()  # seeded: reproducible
    assert [s[0] for s in stages] == ["encoding_prompt", "denoising", "denoising", "denoising", "decoding"]
    assert [s[1:] for s in stages if s[0] == "denoising"] == [(0, 2), (1, 2), (2, 2)]
