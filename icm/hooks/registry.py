"""One hook mechanism for capturing and steering attention outputs.

Both uses share three pieces:

* a per-denoiser *registry* so a site is hooked at most once per purpose (double hooking
  is an error, not a silent second copy of every activation);
* a *denoising clock* that turns "the n-th denoiser call since the scheduler was set up" into
  the step index that keys captures, probes and steering alike: the pipeline's own
  denoising-loop index (``icm.hooks.clock``; schedulers of order 2 are refused);
* an explicit choice of which half of a classifier-free-guidance batch a hook sees. Diffusers
  concatenates ``[unconditional, conditional]``, so the conditional half is the second one.

Hooks are installed on ``__enter__`` and always removed on ``__exit__``, errors included.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from icm.hooks.clock import check_scheduler
from icm.hooks.sites import denoiser_of, resolve_sites
from icm.models.families import family_of

CFGMode = Literal["auto", "cond_half", "all"]


class DoubleHookError(RuntimeError):
    """A site was hooked twice for the same purpose."""


# Registry: denoiser -> {(site, purpose)} currently hooked. Weak so that a dropped pipeline
# takes its entries with it.
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
_CLOCKS: weakref.WeakKeyDictionary[nn.Module, DenoisingClock] = weakref.WeakKeyDictionary()


class DenoisingClock:
    """Counts denoiser calls since the scheduler last set its timesteps.

    Every diffusers pipeline calls ``scheduler.set_timesteps`` once at the start of a
    generation and the denoiser once per loop iteration (the CFG halves travel in one
    batch), so this count is the loop index. More calls than the scheduler has timesteps
    (a separate unconditional call, say) is an error, not a silently shifted step axis. The
    timestep value passed to the denoiser is kept beside it. One clock is shared by all
    contexts on a pipeline (reference counted).
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.step: int = -1
        self.timestep: float | None = None
        self.unconditional = False  # the current call is a separate unconditional branch
        self._timestep_scale, self._separate_uncond = 1.0, False
        self._users = 0
        self._handle: RemovableHandle | None = None
        self._original_set_timesteps: Callable[..., Any] | None = None

    def acquire(self) -> DenoisingClock:
        if self._users == 0:
            self._install()
        self._users += 1
        return self

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._uninstall()

    def reset(self) -> None:
        self.step, self.timestep, self.unconditional = -1, None, False

    def _install(self) -> None:
        scheduler = self.pipe.scheduler
        check_scheduler(scheduler)
        original = scheduler.set_timesteps

        # An instance attribute shadows the method; functools.wraps keeps the signature that
        # diffusers inspects (``retrieve_timesteps`` checks for ``timesteps``/``sigmas``).
        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            self.reset()
            return original(*args, **kwargs)

        scheduler.set_timesteps = set_timesteps
        self._original_set_timesteps = original
        family = family_of(denoiser_of(self.pipe))
        self._timestep_scale = family.timestep_scale
        self._separate_uncond = family.separate_uncond
        self._handle = denoiser_of(self.pipe).register_forward_pre_hook(
            self._tick, with_kwargs=True
        )
        self.reset()

    def _uninstall(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        # Drop the shadowing attribute so the class method shows through again.
        self.pipe.scheduler.__dict__.pop("set_timesteps", None)
        self._handle = self._original_set_timesteps = None

    def _tick(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor):
            t = t.flatten()[0].item() if t.numel() else None
        # In the scheduler's units: FLUX's pipeline hands its transformer t / 1000.
        timestep = None if t is None else float(t) * self._timestep_scale
        # A family whose unconditional branch is a separate call (FLUX with true_cfg_scale
        # > 1) calls the denoiser twice at one timestep: the second call is that branch,
        # no new step, and capture and steering leave it alone.
        self.unconditional = (self._separate_uncond and self.step >= 0
                              and timestep is not None and timestep == self.timestep)
        if self.unconditional:
            return
        self.step += 1
        planned = getattr(self.pipe.scheduler, "timesteps", None)
        if planned is not None and self.step >= len(planned):
            raise RuntimeError(
                f"denoiser call {self.step + 1} but the scheduler planned {len(planned)} "
                "timesteps: this pipeline calls the denoiser more than once per step, which "
                "capture and steering do not support")
        self.timestep = timestep


class SiteHooks:
    """Base context manager: forward hooks on named sites, registered and always removed.

    Subclasses implement :meth:`on_output`, which sees the site, the current step and the
    conditional slice of the batch, and returns a replacement output or ``None``.
    """

    purpose: str = "hook"
    #: Subclasses that read a module's inputs (head maps: the queries and the text keys)
    #: set this; they then implement :meth:`on_call` instead of :meth:`on_output`.
    reads_inputs: bool = False
    #: Subclasses that replace a module's inputs before it runs (prompt injection: the text
    #: states of one cross-attention site) set this and implement :meth:`on_inputs`.
    replaces_inputs: bool = False

    def __init__(self, pipe: Any, sites: Sequence[str], cfg: CFGMode = "auto") -> None:
        if cfg not in ("auto", "cond_half", "all"):
            raise ValueError(f"cfg must be 'auto', 'cond_half' or 'all', not {cfg!r}")
        self.pipe = pipe
        self.denoiser = denoiser_of(pipe)
        self.family = family_of(self.denoiser)
        self.modules = resolve_sites(self.denoiser, list(sites))
        self.sites = list(self.modules)
        self.cfg = cfg
        self._stack: ExitStack | None = None
        self.clock: DenoisingClock | None = None

    # -- which part of the batch is conditional -------------------------------------------
    def cond_slice(self, batch: int) -> slice:
        """Rows of the batch that belong to the conditional (text-guided) branch: with
        ``auto``, the second half when the family batches guidance (``icm.models.families``) and
        the pipeline runs it; every row for an embedded-guidance family (FLUX.1-dev)."""
        batched = self.family.guidance == "batched"
        use_half = self.cfg == "cond_half" or (
            self.cfg == "auto" and batched
            and bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        )
        if not use_half:
            return slice(0, batch)
        if batch % 2:
            raise RuntimeError(f"classifier-free guidance batch of odd size {batch}")
        return slice(batch // 2, batch)

    # -- context protocol ------------------------------------------------------------------
    def __enter__(self) -> SiteHooks:
        hooked = _REGISTRY.setdefault(self.denoiser, set())
        keys = {(site, self.purpose) for site in self.sites}
        clash = sorted(site for site, _ in keys & hooked)
        if clash:
            raise DoubleHookError(
                f"sites already hooked for {self.purpose}: {clash}; exit the other context first"
            )
        stack = ExitStack()
        try:
            hooked |= keys
            stack.callback(hooked.difference_update, keys)
            clock = _CLOCKS.get(self.denoiser)
            if clock is None:
                clock = _CLOCKS[self.denoiser] = DenoisingClock(self.pipe)
            self.clock = clock.acquire()
            stack.callback(clock.release)
            for site, module in self.modules.items():
                if self.replaces_inputs:
                    handle = module.register_forward_pre_hook(
                        functools.partial(self._pre_hook, site), with_kwargs=True)
                elif self.reads_inputs:
                    handle = module.register_forward_hook(
                        functools.partial(self._hook_with_inputs, site), with_kwargs=True)
                else:
                    handle = module.register_forward_hook(
                        functools.partial(self._hook, site), prepend=self.purpose == "steer")
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _step(self, site: str) -> int | None:
        """The step of the current call, or None for a separate unconditional call."""
        assert self.clock is not None
        if self.clock.step < 0:
            raise RuntimeError(
                f"{site} ran before the denoiser: hooks expect calls through the pipeline"
            )
        return None if self.clock.unconditional else self.clock.step

    def _hook(self, site: str, module: nn.Module, args: tuple, output: Any) -> Any:
        step = self._step(site)
        return None if step is None else self.on_output(site, step, output)

    def _hook_with_inputs(self, site: str, module: nn.Module, args: tuple, kwargs: dict,
                          output: Any) -> Any:
        step = self._step(site)
        return None if step is None else self.on_call(site, step, module, args, kwargs, output)

    def _pre_hook(self, site: str, module: nn.Module, args: tuple,
                  kwargs: dict) -> tuple[tuple, dict] | None:
        step = self._step(site)
        return None if step is None else self.on_inputs(site, step, args, kwargs)

    def on_output(self, site: str, step: int, output: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def on_inputs(self, site: str, step: int, args: tuple,
                  kwargs: dict) -> tuple[tuple, dict] | None:  # pragma: no cover
        raise NotImplementedError

    def on_call(self, site: str, step: int, module: nn.Module, args: tuple, kwargs: dict,
                output: Any) -> Any:  # pragma: no cover
        raise NotImplementedError
