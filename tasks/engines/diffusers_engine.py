"""The diffusers engine: WanPipeline, on the device ``tasks.engines.device`` chooses (CUDA, or the CPU).

It is the CPU engine for the built-in tiny models and the fallback where FastVideo's multiprocessing
cannot start. Real Wan2.1 checkpoints load the same way (bf16 transformer, fp32 VAE on CUDA).

A Wan2.2-TI2V checkpoint (``expand_timesteps`` in its model index: ``tiny-wan-ti2v``,
Wan2.2-TI2V-5B) renders text-to-video with ``WanPipeline`` and, for a request with an image,
image-to-video with ``WanImageToVideoPipeline`` built on the same modules (no second copy of the
weights; Wan2.2 has no CLIP image encoder: the image's latent replaces the first frame's).

Checkpoints (``denoising``, see ``tasks.engines.Denoising``): after a step the pipeline's
``callback_on_step_end`` sees the latents and the scheduler, and captures them when the pipeline
wants a state (``tasks.engines.denoising_state``). A render that resumes passes the saved latents
(``latents=``: no noise is drawn), puts the scheduler's state back right after the pipeline's own
``set_timesteps``, and lets the pipeline skip the steps already done (its ``interrupt`` flag).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

from tasks.engines import Denoising, DenoisingState, ProgressFn, RenderOutput, denoising_state, resolve_model_path
from tasks.engines.conditioning import first_frame
from tasks.engines.device import choose_device
from tasks.engines.weights import hub_revision
from tasks.errors import InvalidRequest
from tasks.images import ConditioningImage
from worker_config.settings import Settings

__all__ = ["DiffusersEngine"]

log = logging.getLogger("renderfarm.diffusers")


class DiffusersEngine:
    name = "diffusers"

    def __init__(self, settings: Settings) -> None:
        import torch
        from diffusers import AutoencoderKLWan, WanPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # Progress bars of loading are noise in worker logs; our own progress goes to the task state.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        self.model_id = settings.MODEL_ID
        self.device = choose_device(settings)
        path = resolve_model_path(settings)
        revision = hub_revision(settings)  # MODEL_REVISION, for a Hub model
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        # Wan's VAE is numerically fragile in half precision: keep it in fp32 everywhere.
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32, revision=revision)
        self._pipe = WanPipeline.from_pretrained(path, vae=vae, dtype=dtype, revision=revision).to(self.device)
        self._pipe.set_progress_bar_config(disable=True)
        self._i2v: Any = None
        if self._pipe.config.get("expand_timesteps"):  # Wan2.2-TI2V: the same modules also render from an image
            from diffusers import WanImageToVideoPipeline

            self._i2v = WanImageToVideoPipeline(
                tokenizer=self._pipe.tokenizer, text_encoder=self._pipe.text_encoder, vae=self._pipe.vae,
                scheduler=self._pipe.scheduler, transformer=self._pipe.transformer, image_encoder=None,
                image_processor=None, expand_timesteps=True,
            )  # fmt: skip
            self._i2v.set_progress_bar_config(disable=True)

    def render(
        self, spec: dict[str, Any], progress: ProgressFn, image: ConditioningImage | None = None,
        denoising: Denoising | None = None,
    ) -> RenderOutput:  # fmt: skip
        import torch

        if self._pipe is None:
            from tasks.errors import EngineNotReady

            raise EngineNotReady("the diffusers engine was used after it was closed")
        if image is not None and self._i2v is None:  # validation refuses this first; a model index can disagree
            raise InvalidRequest(f"invalid render request: image: {self.model_id} has no image-to-video pipeline")
        steps = spec["num_inference_steps"]
        pipe = self._pipe if image is None else self._i2v
        generator = torch.Generator(device=self.device).manual_seed(spec["seed"])
        capturing = denoising is not None

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal capturing
            if capturing and denoising is not None and denoising.wants_state(step + 1):
                try:
                    state = denoising_state.capture(step + 1, steps, kwargs["latents"], pipe.scheduler, generator)
                except denoising_state.Uncapturable as exc:
                    log.warning("no checkpoints for this render: %s", exc)
                    capturing = False
                else:
                    denoising.take_state(state)
            progress("denoising", step + 1, steps)
            if step + 1 == steps:
                progress("decoding", None, None)
            return kwargs

        progress("encoding_prompt", None, None)
        with torch.inference_mode():
            prompt_embeds, negative_embeds = self._pipe.encode_prompt(
                prompt=spec["prompt"],
                negative_prompt=spec["negative_prompt"],
                do_classifier_free_guidance=spec["guidance_scale"] > 1.0,
                max_sequence_length=512,
                device=self.device,
            )
            progress("denoising", 0, steps)
            resume = self._usable(denoising.resume(steps), pipe, spec, image) if denoising is not None else None
            if denoising is not None:
                denoising.started(resume.step if resume is not None else 0)
            conditioned = {} if image is None else {"image": first_frame(image, spec["width"], spec["height"])}
            with self._resuming(pipe, resume, generator) as latents:
                out = pipe(
                    **conditioned,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    height=spec["height"],
                    width=spec["width"],
                    num_frames=spec["num_frames"],
                    num_inference_steps=steps,
                    guidance_scale=spec["guidance_scale"],
                    generator=generator,
                    latents=latents,
                    output_type="np",
                    callback_on_step_end=on_step_end,
                )
        frames = out.frames[0]
        del out
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return RenderOutput(frames=frames)

    def _usable(
        self, state: DenoisingState | None, pipe: Any, spec: dict[str, Any], image: ConditioningImage | None
    ) -> DenoisingState | None:
        """``state`` if this render's loop can continue from it; None (said in the log) if not."""
        if state is None:
            return None
        import copy

        channels = pipe.vae.config.z_dim if image is not None else pipe.transformer.config.in_channels
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        frames = (spec["num_frames"] - 1) // temporal + 1
        shape = (1, channels, frames, spec["height"] // spatial, spec["width"] // spatial)
        schedule = copy.deepcopy(pipe.scheduler)  # the schedule this request gets, computed aside
        schedule.set_timesteps(spec["num_inference_steps"], device=self.device)
        try:
            denoising_state.check(state, pipe.scheduler, shape, schedule)
        except denoising_state.StateMismatch as exc:
            log.warning("cannot continue from the saved state (%s): rendering from the first step", exc)
            return None
        return state

    @contextlib.contextmanager
    def _resuming(self, pipe: Any, state: DenoisingState | None, generator: Any) -> Iterator[Any]:
        """The latents to pass the pipeline (None: it draws noise). With a state: right after the
        pipeline's ``set_timesteps`` the scheduler's state is put back and the steps done are skipped."""
        if state is None:
            yield None
            return
        scheduler = pipe.scheduler
        own = scheduler.set_timesteps
        latents = denoising_state.restore(state, scheduler, self.device, generator)

        def set_timesteps(*args: Any, **kwargs: Any) -> None:
            own(*args, **kwargs)
            denoising_state.restore(state, scheduler, self.device)
            pipe._interrupt = denoising_state.SkipSteps(state.step)  # the loop's `if self.interrupt: continue`

        scheduler.set_timesteps = set_timesteps
        try:
            yield latents
        finally:
            del scheduler.set_timesteps  # the class's own again
            pipe._interrupt = False

    def close(self) -> None:
        self._pipe = self._i2v = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a worker dependency
            pass
