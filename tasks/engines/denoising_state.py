"""A denoising loop's state: captured at a step boundary, restored before the next step.

Between two steps a sampler holds more than its latents: a multistep solver (Wan's UniPC, in
diffusers and in FastVideo) keeps its last model outputs, the last sample (its corrector needs
it), its order counters and its step index on the scheduler object, and a sampler that draws
noise per step needs the generator's state. Restoring the latents alone gives another video.
``capture`` takes all of it, generically: every tensor, list of tensors and plain value the
scheduler holds (its configuration excluded: that comes with the model), so any diffusers-style
scheduler works; a scheduler holding anything else (another object) raises ``Uncapturable``
(methods set on the instance, the engines' own wrappers, are behaviour, not state: left out).

Resuming (``Resume``): the engine checks the state against this render first (``check``: the
kind, the scheduler's class, the latents' shape, and the schedule ``set_timesteps`` computes for
this request, tensor for tensor), then hands the loop the restored latents and, right after the
loop's own ``set_timesteps``, puts the scheduler's state back (``restore``). Both loops (diffusers',
FastVideo's) skip an iteration while their ``interrupt`` is true; ``SkipSteps`` is true for the
steps already done, so they pass without computing anything.

FastVideo's loop runs in its own worker process, which hands its state to the pool process as a
file and reads the state to resume from one (``write``, ``read``: safetensors, never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.engines import DenoisingState

__all__ = ["KIND", "Uncapturable", "StateMismatch", "SkipSteps", "capture", "check", "restore", "write", "read"]

KIND = "scheduler-v1"  # ``values["kind"]``: what ``capture`` wrote; ``check`` refuses any other
_SCHEDULER = "scheduler."
_NOT_STATE = frozenset({"config", "_internal_dict"})  # the scheduler's configuration: the model's
_PLAIN = (type(None), bool, int, float, str)


class Uncapturable(Exception):
    """This loop's scheduler holds state that cannot be captured (an object other than tensors and plain values)."""


class StateMismatch(Exception):
    """A state that does not belong to this render's loop; the message says what differs."""


class SkipSteps:
    """An ``interrupt`` flag that is true for the first ``count`` times it is asked, then false."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __bool__(self) -> bool:
        if self.count > 0:
            self.count -= 1
            return True
        return False


def capture(step: int, steps: int, latents: Any, scheduler: Any, generator: Any = None) -> DenoisingState:
    """The loop's state after ``step`` of ``steps``: copies, on the device the tensors are on."""
    tensors: dict[str, Any] = {"latents": _copy(latents)}
    scalars: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {}
    for name, value in vars(scheduler).items():
        if name in _NOT_STATE or (callable(value) and not _is_tensor(value)):
            continue  # its configuration, or a method put on the instance (a wrapper of its own step)
        if _is_tensor(value):
            tensors[_SCHEDULER + name] = _copy(value)
        elif isinstance(value, _PLAIN):
            scalars[name] = value
        elif isinstance(value, list | tuple):
            layout: list[Any] = []
            for index, item in enumerate(value):
                if _is_tensor(item):
                    tensors[f"{_SCHEDULER}{name}.{index}"] = _copy(item)
                    layout.append({"tensor": index})
                elif isinstance(item, _PLAIN):
                    layout.append({"value": item})
                else:
                    raise Uncapturable(f"{type(scheduler).__name__}.{name}[{index}] is a {type(item).__name__}")
            lists[name] = layout
        else:
            raise Uncapturable(f"{type(scheduler).__name__}.{name} is a {type(value).__name__}")
    if generator is not None:
        tensors["generator"] = generator.get_state()
    values = {"kind": KIND, "scheduler_class": type(scheduler).__name__, "scalars": scalars, "lists": lists}
    return DenoisingState(step=step, steps=steps, tensors=tensors, values=values)


def check(state: DenoisingState, scheduler: Any, latents_shape: tuple[int, ...], schedule: Any) -> None:
    """``StateMismatch`` unless ``state`` fits this loop: ``schedule`` is the scheduler as
    ``set_timesteps`` leaves it for this request (its ``timesteps`` and ``sigmas`` must be the state's)."""
    import torch

    if state.values.get("kind") != KIND:
        raise StateMismatch(f"state kind {state.values.get('kind')!r}, expected {KIND!r}")
    if state.values.get("scheduler_class") != type(scheduler).__name__:
        saved = state.values.get("scheduler_class")
        raise StateMismatch(f"scheduler {saved}, this loop's is {type(scheduler).__name__}")
    if not 0 < state.step <= state.steps:
        raise StateMismatch(f"step {state.step} of {state.steps}")
    if (shape := tuple(state.tensors["latents"].shape)) != tuple(latents_shape):
        raise StateMismatch(f"latents of shape {shape}, expected {tuple(latents_shape)}")
    for name in ("timesteps", "sigmas"):
        saved, now = state.tensors.get(_SCHEDULER + name), getattr(schedule, name, None)
        if saved is None or not isinstance(now, torch.Tensor) or not torch.equal(saved.cpu(), now.detach().cpu()):
            raise StateMismatch(f"the scheduler's {name} differ from this request's")


def restore(state: DenoisingState, scheduler: Any, device: Any, generator: Any = None) -> Any:
    """Put the scheduler's state back (call right after ``set_timesteps``); the latents, on ``device``."""
    import torch

    for name, value in state.values["scalars"].items():
        setattr(scheduler, name, value)
    for key, tensor in state.tensors.items():
        if key.startswith(_SCHEDULER) and key.count(".") == 1:
            name = key.removeprefix(_SCHEDULER)
            current = getattr(scheduler, name, None)
            setattr(scheduler, name, tensor.to(current.device if isinstance(current, torch.Tensor) else device))
    for name, layout in state.values["lists"].items():
        setattr(scheduler, name, [
            state.tensors[f"{_SCHEDULER}{name}.{entry['tensor']}"].to(device) if "tensor" in entry else entry["value"]
            for entry in layout
        ])  # fmt: skip
    if generator is not None and "generator" in state.tensors:
        generator.set_state(state.tensors["generator"])
    return state.tensors["latents"].to(device)


def write(state: DenoisingState, path: Path) -> None:
    """The state (its tensors copied to the CPU) as a safetensors file at ``path``, written atomically."""
    from safetensors.torch import save_file

    host = state.to_host()
    meta = {"step": str(state.step), "steps": str(state.steps), "values": json.dumps(state.values)}
    part = path.with_name(path.name + ".part")
    save_file(host.tensors, str(part), metadata=meta)
    part.rename(path)


def read(path: Path) -> DenoisingState:
    """The state ``write`` wrote at ``path`` (tensors on the CPU)."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        for name in handle.keys():
            tensors[name] = handle.get_tensor(name)
    return DenoisingState(int(meta["step"]), int(meta["steps"]), tensors, json.loads(meta["values"]))


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _copy(tensor: Any) -> Any:
    """A contiguous copy on the same device (the loop goes on with the original)."""
    import torch

    return tensor.detach().clone(memory_format=torch.contiguous_format)
